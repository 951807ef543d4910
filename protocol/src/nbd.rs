//! The NBD protocol (Network Block Device, fixed newstyle), sans-IO: the bytes a server
//! sends and parses, and the decisions it makes on them. `node/src/export.rs` owns the
//! socket and the image; this module never reads or writes anything.
//!
//! What the server side speaks (the NetworkBlockDevice project's `doc/proto.md`):
//!
//! * Handshake: the fixed-newstyle greeting, `NO_ZEROES`; a client that does not set
//!   `FIXED_NEWSTYLE` is refused (every client of this century sets it).
//! * Options: `EXPORT_NAME`, `GO` and `INFO` (with the `EXPORT`, `NAME`, `DESCRIPTION` and
//!   `BLOCK_SIZE` infos), `LIST`, `ABORT`, `STRUCTURED_REPLY`, `LIST_META_CONTEXT` and
//!   `SET_META_CONTEXT` for `base:allocation`. Anything else is answered `ERR_UNSUP`.
//! * Transmission: `READ` (structured replies send holes as `OFFSET_HOLE` chunks, so a
//!   client never receives the zeros of an image's empty regions), `BLOCK_STATUS` for
//!   `base:allocation`, `FLUSH`, `DISC`, and, on a writable export, `WRITE`, `TRIM` and
//!   `WRITE_ZEROES`. Every request is checked here (`Session::check`) before the caller
//!   touches the image: bounds, lengths, read-only, negotiated features.
//!
//! Integers on the wire are big-endian (unlike `codec`, which is ours).

use thiserror::Error;

/// `NBDMAGIC`, the first eight bytes a server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation, and the prefix of every option a client sends.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Starts every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

/// Infos, in `INFO` and `GO`.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply chunk types and flags.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

/// `base:allocation` status flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// The one metadata context served, and the id it is given.
pub const BASE_ALLOCATION: &str = "base:allocation";
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Errors in replies (the protocol's own numbers, not the host's errno).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

pub const GREETING_LEN: usize = 18;
pub const CLIENT_FLAGS_LEN: usize = 4;
pub const OPTION_HEADER_LEN: usize = 16;
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
pub const REQUEST_LEN: usize = 28;
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const STRUCTURED_HEADER_LEN: usize = 20;

/// Largest option payload accepted: names and queries are at most 4 KiB strings, so
/// anything larger is a broken or hostile client, and the connection is closed.
pub const OPTION_DATA_MAX: u32 = 64 << 10;
/// Largest `READ` or `WRITE`, advertised as the maximum block size. qemu asks for at most
/// 32 MiB; a larger request is refused, so one request never makes the server hold more.
pub const PAYLOAD_MAX: u32 = 32 << 20;
/// The block size a client should prefer (advertised in `BLOCK_SIZE`).
pub const BLOCK_PREFERRED: u32 = 4096;
/// Extents in one `BLOCK_STATUS` reply at most.
pub const EXTENTS_MAX: usize = 4096;

/// What ends a connection: the peer does not speak the protocol as we do.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum NbdError {
    #[error("the client does not speak fixed-newstyle NBD (client flags {0:#x})")]
    NotFixedNewstyle(u32),
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    #[error("bad option magic {0:#x}")]
    OptionMagic(u64),
    #[error("option {option} carries {len} bytes, more than the {OPTION_DATA_MAX} accepted")]
    OptionTooBig { option: u32, len: u32 },
    #[error("bad request magic {0:#x}")]
    RequestMagic(u32),
    #[error("the client asked for export {0:?}, which is not served here")]
    UnknownExport(String),
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// The server's greeting: magic, `IHAVEOPT`, handshake flags.
pub fn greeting() -> [u8; GREETING_LEN] {
    let mut out = [0; GREETING_LEN];
    out[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// Reads the client's flags; true when it asked for no zeroes after `EXPORT_NAME`.
pub fn client_flags(raw: [u8; CLIENT_FLAGS_LEN]) -> Result<bool, NbdError> {
    let flags = u32::from_be_bytes(raw);
    if flags & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(NbdError::NotFixedNewstyle(flags));
    }
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(NbdError::UnknownClientFlags(flags));
    }
    Ok(flags & FLAG_C_NO_ZEROES != 0)
}

/// An option's header: which option, and how many bytes of data follow.
pub fn option_header(raw: &[u8; OPTION_HEADER_LEN]) -> Result<(u32, u32), NbdError> {
    let magic = be64(&raw[..8]);
    if magic != IHAVEOPT {
        return Err(NbdError::OptionMagic(magic));
    }
    let (option, len) = (be32(&raw[8..12]), be32(&raw[12..16]));
    if len > OPTION_DATA_MAX {
        return Err(NbdError::OptionTooBig { option, len });
    }
    Ok((option, len))
}

/// The one export a server offers.
#[derive(Clone, Debug)]
pub struct ExportInfo {
    /// Its name; a client may also ask for the default export, "".
    pub name: String,
    pub description: String,
    pub size: u64,
    pub writable: bool,
}

impl ExportInfo {
    fn matches(&self, name: &str) -> bool {
        name.is_empty() || name == self.name
    }

    /// The transmission flags for a session on this export.
    fn transmission_flags(&self, structured: bool) -> u16 {
        let mut flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_CAN_MULTI_CONN;
        if structured {
            flags |= FLAG_SEND_DF;
        }
        if self.writable {
            flags |= FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;
        } else {
            flags |= FLAG_READ_ONLY;
        }
        flags
    }
}

/// What the connection does after an option.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Read the next option.
    Options,
    /// Negotiation is over: serve requests.
    Transmit(Session),
    /// Close once `out` is sent.
    Close,
}

/// The negotiation phase: what the client has asked for so far.
#[derive(Debug)]
pub struct Negotiation {
    no_zeroes: bool,
    structured: bool,
    allocation: bool,
}

impl Negotiation {
    pub fn new(no_zeroes: bool) -> Negotiation {
        Negotiation {
            no_zeroes,
            structured: false,
            allocation: false,
        }
    }

    /// Handles one option, appending its replies to `out`. `Err` closes the connection
    /// without a reply (only `EXPORT_NAME` of an unknown export, where the protocol has no
    /// way to say no).
    pub fn option(
        &mut self,
        option: u32,
        data: &[u8],
        export: &ExportInfo,
        out: &mut Vec<u8>,
    ) -> Result<Next, NbdError> {
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(data);
                if !export.matches(&name) {
                    return Err(NbdError::UnknownExport(name.into_owned()));
                }
                out.extend_from_slice(&export.size.to_be_bytes());
                out.extend_from_slice(&export.transmission_flags(self.structured).to_be_bytes());
                if !self.no_zeroes {
                    out.extend_from_slice(&[0; 124]);
                }
                Ok(Next::Transmit(self.session(export)))
            }
            OPT_ABORT => {
                option_reply(out, option, REP_ACK, &[]);
                Ok(Next::Close)
            }
            OPT_LIST => {
                if !data.is_empty() {
                    option_error(out, option, REP_ERR_INVALID, "LIST carries no data");
                } else {
                    let mut server = Vec::with_capacity(4 + export.name.len());
                    put_string32(&mut server, &export.name);
                    option_reply(out, option, REP_SERVER, &server);
                    option_reply(out, option, REP_ACK, &[]);
                }
                Ok(Next::Options)
            }
            OPT_INFO | OPT_GO => self.info(option, data, export, out),
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    option_error(
                        out,
                        option,
                        REP_ERR_INVALID,
                        "STRUCTURED_REPLY carries no data",
                    );
                } else {
                    self.structured = true;
                    option_reply(out, option, REP_ACK, &[]);
                }
                Ok(Next::Options)
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_context(option, data, export, out);
                Ok(Next::Options)
            }
            OPT_STARTTLS => {
                option_error(
                    out,
                    option,
                    REP_ERR_UNSUP,
                    "TLS is not served: use a unix socket or loopback",
                );
                Ok(Next::Options)
            }
            _ => {
                option_error(out, option, REP_ERR_UNSUP, "option not supported");
                Ok(Next::Options)
            }
        }
    }

    fn session(&self, export: &ExportInfo) -> Session {
        Session {
            size: export.size,
            writable: export.writable,
            structured: self.structured,
            allocation: self.structured && self.allocation,
        }
    }

    fn info(
        &mut self,
        option: u32,
        data: &[u8],
        export: &ExportInfo,
        out: &mut Vec<u8>,
    ) -> Result<Next, NbdError> {
        let Some((name, requests)) = parse_info(data) else {
            option_error(out, option, REP_ERR_INVALID, "malformed INFO/GO request");
            return Ok(Next::Options);
        };
        if !export.matches(&name) {
            option_error(out, option, REP_ERR_UNKNOWN, "no such export");
            return Ok(Next::Options);
        }
        let mut info = Vec::with_capacity(12);
        info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        info.extend_from_slice(&export.size.to_be_bytes());
        info.extend_from_slice(&export.transmission_flags(self.structured).to_be_bytes());
        option_reply(out, option, REP_INFO, &info);
        for request in requests {
            let mut info = request.to_be_bytes().to_vec();
            match request {
                INFO_NAME => info.extend_from_slice(export.name.as_bytes()),
                INFO_DESCRIPTION => info.extend_from_slice(export.description.as_bytes()),
                INFO_BLOCK_SIZE => {
                    for size in [1, BLOCK_PREFERRED, PAYLOAD_MAX] {
                        info.extend_from_slice(&size.to_be_bytes());
                    }
                }
                _ => continue,
            }
            option_reply(out, option, REP_INFO, &info);
        }
        option_reply(out, option, REP_ACK, &[]);
        Ok(match option {
            OPT_GO => Next::Transmit(self.session(export)),
            _ => Next::Options,
        })
    }

    fn meta_context(&mut self, option: u32, data: &[u8], export: &ExportInfo, out: &mut Vec<u8>) {
        if option == OPT_SET_META_CONTEXT && !self.structured {
            option_error(
                out,
                option,
                REP_ERR_INVALID,
                "negotiate STRUCTURED_REPLY first",
            );
            return;
        }
        let Some((name, queries)) = parse_meta_context(data) else {
            option_error(
                out,
                option,
                REP_ERR_INVALID,
                "malformed meta context request",
            );
            return;
        };
        if !export.matches(&name) {
            option_error(out, option, REP_ERR_UNKNOWN, "no such export");
            return;
        }
        // LIST with no queries lists every context; SET with none selects none.
        let wanted = match (option, queries.is_empty()) {
            (OPT_LIST_META_CONTEXT, true) => true,
            _ => queries
                .iter()
                .any(|q| q == BASE_ALLOCATION || (option == OPT_LIST_META_CONTEXT && q == "base:")),
        };
        if option == OPT_SET_META_CONTEXT {
            self.allocation = wanted;
        }
        if wanted {
            let mut reply = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
            reply.extend_from_slice(BASE_ALLOCATION.as_bytes());
            option_reply(out, option, REP_META_CONTEXT, &reply);
        }
        option_reply(out, option, REP_ACK, &[]);
    }
}

fn put_string32(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Takes a 32-bit-length-prefixed string from the front of `data`.
fn take_string32(data: &mut &[u8]) -> Option<String> {
    let len = be32(data.get(..4)?) as usize;
    let bytes = data.get(4..4 + len)?;
    let s = std::str::from_utf8(bytes).ok()?.to_owned();
    *data = &data[4 + len..];
    Some(s)
}

fn parse_info(mut data: &[u8]) -> Option<(String, Vec<u16>)> {
    let name = take_string32(&mut data)?;
    let n = be16(data.get(..2)?) as usize;
    let rest = &data[2..];
    if rest.len() != n * 2 {
        return None;
    }
    Some((name, rest.chunks_exact(2).map(be16).collect()))
}

fn parse_meta_context(mut data: &[u8]) -> Option<(String, Vec<String>)> {
    let name = take_string32(&mut data)?;
    let n = be32(data.get(..4)?) as usize;
    data = &data[4..];
    // Each query takes at least its 4-byte length: a count beyond that is a lie.
    if n > data.len() / 4 {
        return None;
    }
    let mut queries = Vec::with_capacity(n);
    for _ in 0..n {
        queries.push(take_string32(&mut data)?);
    }
    data.is_empty().then_some((name, queries))
}

/// Appends one option reply.
pub fn option_reply(out: &mut Vec<u8>, option: u32, kind: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

fn option_error(out: &mut Vec<u8>, option: u32, kind: u32, message: &str) {
    option_reply(out, option, kind, message.as_bytes());
}

/// A command in the transmission phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disconnect,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    Other(u16),
}

impl Command {
    fn from_u16(n: u16) -> Command {
        match n {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disconnect,
            3 => Command::Flush,
            4 => Command::Trim,
            5 => Command::Cache,
            6 => Command::WriteZeroes,
            7 => Command::BlockStatus,
            n => Command::Other(n),
        }
    }

    pub fn to_u16(self) -> u16 {
        match self {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disconnect => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::Cache => 5,
            Command::WriteZeroes => 6,
            Command::BlockStatus => 7,
            Command::Other(n) => n,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    /// The client's handle for the request, echoed in every reply to it.
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    pub fn decode(raw: &[u8; REQUEST_LEN]) -> Result<Request, NbdError> {
        let magic = be32(&raw[..4]);
        if magic != REQUEST_MAGIC {
            return Err(NbdError::RequestMagic(magic));
        }
        Ok(Request {
            flags: be16(&raw[4..6]),
            command: Command::from_u16(be16(&raw[6..8])),
            cookie: be64(&raw[8..16]),
            offset: be64(&raw[16..24]),
            length: be32(&raw[24..28]),
        })
    }

    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut out = [0; REQUEST_LEN];
        out[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.to_u16().to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..].copy_from_slice(&self.length.to_be_bytes());
        out
    }

    /// Bytes of data that follow the header on the wire: a write's payload. They must be
    /// read even when the request is refused.
    pub fn payload_len(&self) -> u32 {
        match self.command {
            Command::Write => self.length,
            _ => 0,
        }
    }
}

/// What negotiation settled, for the transmission phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Session {
    pub size: u64,
    pub writable: bool,
    pub structured: bool,
    /// `base:allocation` was selected: `BLOCK_STATUS` is served.
    pub allocation: bool,
}

impl Session {
    /// Whether the request may be served, and the error to answer if not.
    pub fn check(&self, request: &Request) -> Result<(), u32> {
        let in_bounds = request
            .offset
            .checked_add(u64::from(request.length))
            .is_some_and(|end| end <= self.size);
        let known_flags =
            CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO;
        if request.flags & !known_flags != 0 {
            return Err(EINVAL);
        }
        match request.command {
            Command::Read => {
                if request.length > PAYLOAD_MAX {
                    return Err(EOVERFLOW);
                }
                if request.flags & CMD_FLAG_DF != 0 && !self.structured {
                    return Err(EINVAL);
                }
                in_bounds.then_some(()).ok_or(EINVAL)
            }
            Command::Write | Command::Trim | Command::WriteZeroes => {
                if !self.writable {
                    return Err(EPERM);
                }
                if request.command == Command::Write && request.length > PAYLOAD_MAX {
                    return Err(EOVERFLOW);
                }
                if request.command == Command::WriteZeroes
                    && request.flags & CMD_FLAG_FAST_ZERO != 0
                {
                    // Zeroing here is a write of zeros to the overlay, never "fast".
                    return Err(ENOTSUP);
                }
                in_bounds.then_some(()).ok_or(ENOSPC)
            }
            Command::BlockStatus => {
                if !self.allocation || request.length == 0 {
                    return Err(EINVAL);
                }
                // The length may run past the end; the reply stops there.
                (request.offset < self.size).then_some(()).ok_or(EINVAL)
            }
            Command::Flush | Command::Disconnect => Ok(()),
            Command::Cache | Command::Other(_) => Err(EINVAL),
        }
    }
}

/// A simple reply: `error` 0 for success; a successful read's data follows it.
pub fn simple_reply(out: &mut Vec<u8>, cookie: u64, error: u32) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

fn chunk_header(out: &mut Vec<u8>, done: bool, kind: u16, cookie: u64, len: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&(if done { REPLY_FLAG_DONE } else { 0 }).to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// The header of an `OFFSET_DATA` chunk; its `n_bytes` of data follow it.
pub fn data_chunk_header(out: &mut Vec<u8>, cookie: u64, done: bool, offset: u64, n_bytes: u32) {
    chunk_header(out, done, REPLY_TYPE_OFFSET_DATA, cookie, 8 + n_bytes);
    out.extend_from_slice(&offset.to_be_bytes());
}

/// An `OFFSET_HOLE` chunk: `n_bytes` of zeros at `offset`, sent as nothing.
pub fn hole_chunk(out: &mut Vec<u8>, cookie: u64, done: bool, offset: u64, n_bytes: u32) {
    chunk_header(out, done, REPLY_TYPE_OFFSET_HOLE, cookie, 12);
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&n_bytes.to_be_bytes());
}

/// A `BLOCK_STATUS` reply for `base:allocation`: `(length, flags)` descriptors in order.
pub fn block_status_chunk(out: &mut Vec<u8>, cookie: u64, extents: &[(u32, u32)]) {
    chunk_header(
        out,
        true,
        REPLY_TYPE_BLOCK_STATUS,
        cookie,
        4 + 8 * extents.len() as u32,
    );
    out.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
    for (len, flags) in extents {
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
    }
}

/// The success of a request with no data: a simple reply, or a `NONE` chunk.
pub fn done_reply(out: &mut Vec<u8>, session: &Session, cookie: u64) {
    if session.structured {
        chunk_header(out, true, REPLY_TYPE_NONE, cookie, 0);
    } else {
        simple_reply(out, cookie, 0);
    }
}

/// A request's failure, with a message for a structured client.
pub fn error_reply(out: &mut Vec<u8>, session: &Session, cookie: u64, error: u32, message: &str) {
    if session.structured {
        let message = &message.as_bytes()[..message.len().min(4096)];
        chunk_header(
            out,
            true,
            REPLY_TYPE_ERROR,
            cookie,
            6 + message.len() as u32,
        );
        out.extend_from_slice(&error.to_be_bytes());
        out.extend_from_slice(&(message.len() as u16).to_be_bytes());
        out.extend_from_slice(message);
    } else {
        simple_reply(out, cookie, error);
    }
}

/// The client side, as far as cairn's own tests and drills need it: option and request
/// encoders, and reply decoders.
pub mod client {
    use super::*;

    /// The client flags a modern client sends.
    pub fn flags() -> [u8; CLIENT_FLAGS_LEN] {
        (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes()
    }

    /// One option with its data.
    pub fn option(out: &mut Vec<u8>, option: u32, data: &[u8]) {
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
    }

    /// `GO` (or `INFO`) for export `name`, asking for `infos`.
    pub fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut data = Vec::new();
        put_string32(&mut data, name);
        data.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for info in infos {
            data.extend_from_slice(&info.to_be_bytes());
        }
        data
    }

    /// `SET_META_CONTEXT` (or `LIST_`) data for export `name`.
    pub fn meta_context_data(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut data = Vec::new();
        put_string32(&mut data, name);
        data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for query in queries {
            put_string32(&mut data, query);
        }
        data
    }

    /// An option reply's header: (option, reply type, data length), or None if the magic
    /// is wrong.
    pub fn option_reply_header(raw: &[u8; OPTION_REPLY_HEADER_LEN]) -> Option<(u32, u32, u32)> {
        (be64(&raw[..8]) == OPTION_REPLY_MAGIC)
            .then(|| (be32(&raw[8..12]), be32(&raw[12..16]), be32(&raw[16..20])))
    }

    /// The first four bytes of a reply in transmission: which kind of reply follows.
    pub fn reply_magic(raw: [u8; 4]) -> u32 {
        u32::from_be_bytes(raw)
    }

    /// The rest of a simple reply after its magic: (error, cookie).
    pub fn simple_reply_rest(raw: &[u8; SIMPLE_REPLY_LEN - 4]) -> (u32, u64) {
        (be32(&raw[..4]), be64(&raw[4..12]))
    }

    /// The rest of a structured chunk header after its magic: (flags, type, cookie,
    /// payload length).
    pub fn chunk_header_rest(raw: &[u8; STRUCTURED_HEADER_LEN - 4]) -> (u16, u16, u64, u32) {
        (
            be16(&raw[..2]),
            be16(&raw[2..4]),
            be64(&raw[4..12]),
            be32(&raw[12..16]),
        )
    }

    pub fn u32_at(b: &[u8], at: usize) -> u32 {
        be32(&b[at..])
    }

    pub fn u64_at(b: &[u8], at: usize) -> u64 {
        be64(&b[at..])
    }
}

#[cfg(test)]
mod tests {
    use super::client;
    use super::*;

    fn export() -> ExportInfo {
        ExportInfo {
            name: "fileserver".into(),
            description: "fileserver@1a2b".into(),
            size: 1 << 20,
            writable: false,
        }
    }

    /// Splits option replies into (option, type, data).
    fn replies(mut bytes: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let header: [u8; OPTION_REPLY_HEADER_LEN] = bytes[..20].try_into().unwrap();
            let (option, kind, len) = client::option_reply_header(&header).unwrap();
            out.push((option, kind, bytes[20..20 + len as usize].to_vec()));
            bytes = &bytes[20 + len as usize..];
        }
        out
    }

    #[test]
    fn the_greeting_is_fixed_newstyle_and_a_client_without_it_is_refused() {
        let g = greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(be16(&g[16..]), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        assert_eq!(client_flags(client::flags()), Ok(true));
        assert_eq!(client_flags(1u32.to_be_bytes()), Ok(false));
        assert_eq!(
            client_flags(0u32.to_be_bytes()),
            Err(NbdError::NotFixedNewstyle(0))
        );
        assert_eq!(
            client_flags(7u32.to_be_bytes()),
            Err(NbdError::UnknownClientFlags(7))
        );
    }

    #[test]
    fn an_option_header_with_bad_magic_or_huge_data_closes_the_connection() {
        let mut raw = Vec::new();
        client::option(&mut raw, OPT_GO, &[]);
        let header: [u8; 16] = raw[..16].try_into().unwrap();
        assert_eq!(option_header(&header), Ok((OPT_GO, 0)));
        let mut bad = header;
        bad[0] ^= 1;
        assert!(matches!(option_header(&bad), Err(NbdError::OptionMagic(_))));
        let mut huge = header;
        huge[12..].copy_from_slice(&(OPTION_DATA_MAX + 1).to_be_bytes());
        assert!(matches!(
            option_header(&huge),
            Err(NbdError::OptionTooBig { .. })
        ));
    }

    #[test]
    fn go_with_structured_replies_and_base_allocation_gives_a_session_that_serves_block_status() {
        let export = export();
        let mut n = Negotiation::new(true);
        let mut out = Vec::new();
        // SET_META_CONTEXT before STRUCTURED_REPLY is refused.
        let meta = client::meta_context_data("", &[BASE_ALLOCATION, "qemu:dirty-bitmap:x"]);
        assert_eq!(
            n.option(OPT_SET_META_CONTEXT, &meta, &export, &mut out),
            Ok(Next::Options)
        );
        assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
        out.clear();
        assert_eq!(
            n.option(OPT_STRUCTURED_REPLY, &[], &export, &mut out),
            Ok(Next::Options)
        );
        assert_eq!(replies(&out), vec![(OPT_STRUCTURED_REPLY, REP_ACK, vec![])]);
        out.clear();
        n.option(OPT_SET_META_CONTEXT, &meta, &export, &mut out)
            .unwrap();
        let r = replies(&out);
        assert_eq!(r.len(), 2, "one context matched, then ACK");
        assert_eq!(r[0].1, REP_META_CONTEXT);
        assert_eq!(&r[0].2[..4], &BASE_ALLOCATION_ID.to_be_bytes());
        assert_eq!(&r[0].2[4..], BASE_ALLOCATION.as_bytes());
        assert_eq!(r[1].1, REP_ACK);
        out.clear();
        let go = client::go_data("fileserver", &[INFO_BLOCK_SIZE, INFO_NAME]);
        let Ok(Next::Transmit(session)) = n.option(OPT_GO, &go, &export, &mut out) else {
            panic!("GO starts transmission");
        };
        assert_eq!(
            session,
            Session {
                size: 1 << 20,
                writable: false,
                structured: true,
                allocation: true
            }
        );
        let r = replies(&out);
        let kinds: Vec<u32> = r.iter().map(|r| r.1).collect();
        assert_eq!(kinds, vec![REP_INFO, REP_INFO, REP_INFO, REP_ACK]);
        assert_eq!(be16(&r[0].2), INFO_EXPORT);
        assert_eq!(be64(&r[0].2[2..]), 1 << 20);
        let flags = be16(&r[0].2[10..]);
        assert_ne!(flags & FLAG_READ_ONLY, 0);
        assert_ne!(flags & FLAG_SEND_DF, 0);
        assert_eq!(be32(&r[1].2[6..]), BLOCK_PREFERRED);
        assert_eq!(be32(&r[1].2[10..]), PAYLOAD_MAX);
        assert_eq!(&r[2].2[2..], b"fileserver");
    }

    #[test]
    fn unknown_exports_options_and_malformed_data_are_answered_and_the_client_may_go_on() {
        let export = export();
        let mut n = Negotiation::new(true);
        let mut out = Vec::new();
        n.option(OPT_GO, &client::go_data("other", &[]), &export, &mut out)
            .unwrap();
        n.option(OPT_INFO, &[0, 0, 0, 9], &export, &mut out)
            .unwrap();
        n.option(OPT_STARTTLS, &[], &export, &mut out).unwrap();
        n.option(42, &[1, 2, 3], &export, &mut out).unwrap();
        n.option(
            OPT_SET_META_CONTEXT,
            &[0, 0, 0, 0, 255, 255, 255, 255],
            &export,
            &mut out,
        )
        .unwrap();
        let kinds: Vec<u32> = replies(&out).iter().map(|r| r.1).collect();
        assert_eq!(
            kinds,
            vec![
                REP_ERR_UNKNOWN,
                REP_ERR_INVALID,
                REP_ERR_UNSUP,
                REP_ERR_UNSUP,
                REP_ERR_INVALID
            ]
        );
        // EXPORT_NAME of an unknown export cannot be answered: the connection closes.
        assert!(n
            .option(OPT_EXPORT_NAME, b"other", &export, &mut Vec::new())
            .is_err());
        // LIST names the export; ABORT acks and closes.
        out.clear();
        n.option(OPT_LIST, &[], &export, &mut out).unwrap();
        let r = replies(&out);
        assert_eq!(r[0].1, REP_SERVER);
        assert_eq!(&r[0].2[4..], b"fileserver");
        assert_eq!(
            n.option(OPT_ABORT, &[], &export, &mut Vec::new()),
            Ok(Next::Close)
        );
    }

    #[test]
    fn export_name_answers_size_and_flags_with_zeroes_only_when_the_client_wants_them() {
        let export = export();
        for (no_zeroes, len) in [(true, 10), (false, 134)] {
            let mut out = Vec::new();
            let next = Negotiation::new(no_zeroes)
                .option(OPT_EXPORT_NAME, b"", &export, &mut out)
                .unwrap();
            assert!(matches!(next, Next::Transmit(s) if !s.structured && !s.allocation));
            assert_eq!(out.len(), len);
            assert_eq!(be64(&out), 1 << 20);
        }
    }

    fn request(command: Command, offset: u64, length: u32) -> Request {
        Request {
            flags: 0,
            command,
            cookie: 7,
            offset,
            length,
        }
    }

    #[test]
    fn requests_round_trip_and_are_checked_against_the_session() {
        let r = Request {
            flags: CMD_FLAG_DF,
            command: Command::Read,
            cookie: 0xfeed,
            offset: 4096,
            length: 512,
        };
        assert_eq!(Request::decode(&r.encode()), Ok(r));
        let mut bad = r.encode();
        bad[0] = 0;
        assert!(matches!(
            Request::decode(&bad),
            Err(NbdError::RequestMagic(_))
        ));

        let ro = Session {
            size: 1 << 20,
            writable: false,
            structured: false,
            allocation: false,
        };
        assert_eq!(ro.check(&request(Command::Read, 0, 1 << 20)), Ok(()));
        assert_eq!(ro.check(&request(Command::Read, 1, 1 << 20)), Err(EINVAL));
        assert_eq!(ro.check(&request(Command::Read, u64::MAX, 2)), Err(EINVAL));
        assert_eq!(ro.check(&r), Err(EINVAL), "DF needs structured replies");
        assert_eq!(ro.check(&request(Command::Write, 0, 512)), Err(EPERM));
        assert_eq!(ro.check(&request(Command::Trim, 0, 512)), Err(EPERM));
        assert_eq!(
            ro.check(&request(Command::BlockStatus, 0, 512)),
            Err(EINVAL)
        );
        assert_eq!(ro.check(&request(Command::Cache, 0, 512)), Err(EINVAL));
        assert_eq!(ro.check(&request(Command::Flush, 0, 0)), Ok(()));
        assert_eq!(request(Command::Write, 0, 512).payload_len(), 512);
        assert_eq!(request(Command::Read, 0, 512).payload_len(), 0);

        let rw = Session {
            size: 1 << 20,
            writable: true,
            structured: true,
            allocation: true,
        };
        let big = Session {
            size: u64::MAX,
            ..rw
        };
        assert_eq!(
            big.check(&request(Command::Read, 0, PAYLOAD_MAX + 1)),
            Err(EOVERFLOW)
        );
        assert_eq!(
            rw.check(&request(Command::Write, (1 << 20) - 512, 512)),
            Ok(())
        );
        assert_eq!(rw.check(&request(Command::Write, 1 << 20, 1)), Err(ENOSPC));
        assert_eq!(
            rw.check(&request(Command::BlockStatus, 4096, u32::MAX)),
            Ok(())
        );
        assert_eq!(
            rw.check(&request(Command::BlockStatus, 1 << 20, 1)),
            Err(EINVAL)
        );
        assert_eq!(rw.check(&request(Command::BlockStatus, 0, 0)), Err(EINVAL));
        let fast = Request {
            flags: CMD_FLAG_FAST_ZERO,
            ..request(Command::WriteZeroes, 0, 4096)
        };
        assert_eq!(rw.check(&fast), Err(ENOTSUP));
        let unknown = Request {
            flags: 1 << 9,
            ..request(Command::Read, 0, 1)
        };
        assert_eq!(rw.check(&unknown), Err(EINVAL));
    }

    #[test]
    fn replies_decode_as_a_client_reads_them() {
        let s = Session {
            size: 1 << 20,
            writable: false,
            structured: true,
            allocation: true,
        };
        let mut out = Vec::new();
        data_chunk_header(&mut out, 9, false, 4096, 3);
        out.extend_from_slice(b"abc");
        hole_chunk(&mut out, 9, true, 4099, 100);
        block_status_chunk(&mut out, 10, &[(4096, 0), (8192, STATE_HOLE | STATE_ZERO)]);
        error_reply(&mut out, &s, 11, EIO, "chunk unavailable");
        done_reply(&mut out, &s, 12);
        let mut at = 0;
        let mut seen = Vec::new();
        while at < out.len() {
            assert_eq!(
                client::reply_magic(out[at..at + 4].try_into().unwrap()),
                STRUCTURED_REPLY_MAGIC
            );
            let (flags, kind, cookie, len) =
                client::chunk_header_rest(out[at + 4..at + 20].try_into().unwrap());
            let payload = &out[at + 20..at + 20 + len as usize];
            seen.push((flags, kind, cookie, payload.to_vec()));
            at += 20 + len as usize;
        }
        assert_eq!(seen.len(), 5);
        assert_eq!(
            (seen[0].0, seen[0].1, seen[0].2),
            (0, REPLY_TYPE_OFFSET_DATA, 9)
        );
        assert_eq!(client::u64_at(&seen[0].3, 0), 4096);
        assert_eq!(&seen[0].3[8..], b"abc");
        assert_eq!(
            (seen[1].0, seen[1].1),
            (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE)
        );
        assert_eq!(client::u32_at(&seen[1].3, 8), 100);
        assert_eq!(seen[2].1, REPLY_TYPE_BLOCK_STATUS);
        assert_eq!(client::u32_at(&seen[2].3, 0), BASE_ALLOCATION_ID);
        assert_eq!(client::u32_at(&seen[2].3, 12), 8192);
        assert_eq!(client::u32_at(&seen[2].3, 16), STATE_HOLE | STATE_ZERO);
        assert_eq!(seen[3].1, REPLY_TYPE_ERROR);
        assert_eq!(client::u32_at(&seen[3].3, 0), EIO);
        assert_eq!(&seen[3].3[6..], b"chunk unavailable");
        assert_eq!(
            (seen[4].0, seen[4].1, seen[4].3.len()),
            (REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0)
        );

        let simple = Session {
            structured: false,
            ..s
        };
        let mut out = Vec::new();
        error_reply(&mut out, &simple, 5, EPERM, "read-only");
        done_reply(&mut out, &simple, 6);
        assert_eq!(out.len(), 32);
        assert_eq!(
            client::reply_magic(out[..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        assert_eq!(
            client::simple_reply_rest(out[4..16].try_into().unwrap()),
            (EPERM, 5)
        );
        assert_eq!(
            client::simple_reply_rest(out[20..32].try_into().unwrap()),
            (0, 6)
        );
    }
}
