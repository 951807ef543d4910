//! A small NBD client for the export tests, on the protocol crate's client encoders: it
//! negotiates as qemu does (structured replies, `base:allocation`, `GO`) or as an old
//! client (`EXPORT_NAME`, simple replies), and turns replies back into bytes.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use cairn_protocol::nbd::{self, client, Command as Cmd, Request};

trait Socket: Read + Write {}
impl<T: Read + Write> Socket for T {}

pub struct Client {
    stream: Box<dyn Socket>,
    pub size: u64,
    pub flags: u16,
    structured: bool,
    cookie: u64,
}

/// What a request got back: the server's error number, or its answer.
pub type Answer<T> = std::result::Result<T, u32>;

/// An option reply before the ACK: its type and data.
type OptionReply = (u32, Vec<u8>);

impl Client {
    /// Connects to `nbd://HOST:PORT/NAME` or `nbd+unix:///NAME?socket=PATH`.
    pub fn connect(uri: &str, structured: bool) -> Result<Client> {
        let timeout = Some(Duration::from_secs(60));
        let (stream, name): (Box<dyn Socket>, &str) =
            if let Some(rest) = uri.strip_prefix("nbd+unix:///") {
                let (name, socket) = rest.split_once("?socket=").context("no socket in URI")?;
                let s = UnixStream::connect(socket).with_context(|| format!("connect {socket}"))?;
                s.set_read_timeout(timeout)?;
                (Box::new(s), name)
            } else if let Some(rest) = uri.strip_prefix("nbd://") {
                let (addr, name) = rest.split_once('/').context("no export name in URI")?;
                let s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
                s.set_read_timeout(timeout)?;
                (Box::new(s), name)
            } else {
                bail!("not an NBD URI: {uri}");
            };
        let mut c = Client {
            stream,
            size: 0,
            flags: 0,
            structured,
            cookie: 0,
        };
        c.handshake(name)?;
        Ok(c)
    }

    fn exact(&mut self, n: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0; n];
        self.stream.read_exact(&mut buf)?;
        Ok(buf)
    }

    fn send_option(&mut self, option: u32, data: &[u8]) -> Result<()> {
        let mut out = Vec::new();
        client::option(&mut out, option, data);
        Ok(self.stream.write_all(&out)?)
    }

    /// Reads option replies up to the ACK (or an error), returning those before it.
    fn option_replies(&mut self, option: u32) -> Result<Answer<Vec<OptionReply>>> {
        let mut replies = Vec::new();
        loop {
            let header: [u8; nbd::OPTION_REPLY_HEADER_LEN] = self
                .exact(nbd::OPTION_REPLY_HEADER_LEN)?
                .try_into()
                .unwrap();
            let (opt, kind, len) = client::option_reply_header(&header).context("reply magic")?;
            ensure!(opt == option, "reply to option {opt}, asked {option}");
            let data = self.exact(len as usize)?;
            match kind {
                nbd::REP_ACK => return Ok(Ok(replies)),
                k if k & (1 << 31) != 0 => return Ok(Err(k)),
                k => replies.push((k, data)),
            }
        }
    }

    fn handshake(&mut self, name: &str) -> Result<()> {
        let greeting = self.exact(nbd::GREETING_LEN)?;
        ensure!(greeting == nbd::greeting(), "greeting {greeting:?}");
        if !self.structured {
            // An old client: no NO_ZEROES, EXPORT_NAME.
            self.stream
                .write_all(&nbd::FLAG_C_FIXED_NEWSTYLE.to_be_bytes())?;
            self.send_option(nbd::OPT_EXPORT_NAME, name.as_bytes())?;
            let answer = self.exact(10 + 124)?;
            self.size = client::u64_at(&answer, 0);
            self.flags = u16::from_be_bytes([answer[8], answer[9]]);
            return Ok(());
        }
        self.stream.write_all(&client::flags())?;
        self.send_option(nbd::OPT_STRUCTURED_REPLY, &[])?;
        self.option_replies(nbd::OPT_STRUCTURED_REPLY)?
            .map_err(|e| anyhow::anyhow!("STRUCTURED_REPLY refused: {e:#x}"))?;
        let meta = client::meta_context_data(name, &[nbd::BASE_ALLOCATION]);
        self.send_option(nbd::OPT_SET_META_CONTEXT, &meta)?;
        let contexts = self
            .option_replies(nbd::OPT_SET_META_CONTEXT)?
            .map_err(|e| anyhow::anyhow!("SET_META_CONTEXT refused: {e:#x}"))?;
        ensure!(contexts.len() == 1, "one context: {contexts:?}");
        self.send_option(nbd::OPT_GO, &client::go_data(name, &[nbd::INFO_BLOCK_SIZE]))?;
        let infos = self
            .option_replies(nbd::OPT_GO)?
            .map_err(|e| anyhow::anyhow!("GO refused: {e:#x}"))?;
        let export = infos
            .iter()
            .find(|(_, d)| d[..2] == nbd::INFO_EXPORT.to_be_bytes())
            .context("no export info")?;
        self.size = client::u64_at(&export.1, 2);
        self.flags = u16::from_be_bytes([export.1[10], export.1[11]]);
        Ok(())
    }

    fn send(&mut self, command: Cmd, offset: u64, length: u32, payload: &[u8]) -> Result<u64> {
        self.cookie += 1;
        let request = Request {
            flags: 0,
            command,
            cookie: self.cookie,
            offset,
            length,
        };
        self.stream.write_all(&request.encode())?;
        self.stream.write_all(payload)?;
        Ok(self.cookie)
    }

    /// Reads one reply to `cookie`: its data (for a read of `len` bytes at `offset`) or
    /// block status descriptors.
    fn receive(&mut self, cookie: u64, offset: u64, len: usize) -> Result<Answer<Reply>> {
        let magic = client::reply_magic(self.exact(4)?.try_into().unwrap());
        if magic == nbd::SIMPLE_REPLY_MAGIC {
            let (error, got) = client::simple_reply_rest(&self.exact(12)?.try_into().unwrap());
            ensure!(got == cookie, "cookie {got}, expected {cookie}");
            if error != 0 {
                return Ok(Err(error));
            }
            return Ok(Ok(Reply {
                data: self.exact(len)?,
                status: Vec::new(),
                holes: 0,
            }));
        }
        ensure!(
            magic == nbd::STRUCTURED_REPLY_MAGIC,
            "reply magic {magic:#x}"
        );
        let mut reply = Reply {
            data: vec![0; len],
            status: Vec::new(),
            holes: 0,
        };
        let mut error = None;
        loop {
            let (flags, kind, got, n) =
                client::chunk_header_rest(&self.exact(16)?.try_into().unwrap());
            ensure!(got == cookie, "cookie {got}, expected {cookie}");
            let payload = self.exact(n as usize)?;
            match kind {
                nbd::REPLY_TYPE_OFFSET_DATA => {
                    let at = (client::u64_at(&payload, 0) - offset) as usize;
                    reply.data[at..at + payload.len() - 8].copy_from_slice(&payload[8..]);
                }
                nbd::REPLY_TYPE_OFFSET_HOLE => {
                    let at = (client::u64_at(&payload, 0) - offset) as usize;
                    let n = client::u32_at(&payload, 8) as usize;
                    reply.data[at..at + n].fill(0);
                    reply.holes += n as u64;
                }
                nbd::REPLY_TYPE_BLOCK_STATUS => {
                    for d in payload[4..].chunks_exact(8) {
                        reply
                            .status
                            .push((client::u32_at(d, 0), client::u32_at(d, 4)));
                    }
                }
                nbd::REPLY_TYPE_ERROR => error = Some(client::u32_at(&payload, 0)),
                nbd::REPLY_TYPE_NONE => {}
                other => bail!("unexpected chunk type {other}"),
            }
            if flags & nbd::REPLY_FLAG_DONE != 0 {
                break;
            }
            if magic != client::reply_magic(self.exact(4)?.try_into().unwrap()) {
                bail!("bad chunk magic");
            }
        }
        Ok(error.map_or(Ok(reply), Err))
    }

    pub fn read(&mut self, offset: u64, len: u32) -> Result<Answer<Reply>> {
        let cookie = self.send(Cmd::Read, offset, len, &[])?;
        self.receive(cookie, offset, len as usize)
    }

    pub fn block_status(&mut self, offset: u64, len: u32) -> Result<Answer<Vec<(u32, u32)>>> {
        let cookie = self.send(Cmd::BlockStatus, offset, len, &[])?;
        Ok(self.receive(cookie, offset, 0)?.map(|r| r.status))
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<Answer<()>> {
        let cookie = self.send(Cmd::Write, offset, data.len() as u32, data)?;
        Ok(self.receive(cookie, offset, 0)?.map(|_| ()))
    }

    pub fn disconnect(mut self) -> Result<()> {
        self.send(Cmd::Disconnect, 0, 0, &[])?;
        Ok(())
    }
}

#[derive(Debug, Default)]
pub struct Reply {
    pub data: Vec<u8>,
    pub status: Vec<(u32, u32)>,
    /// Bytes answered as holes rather than sent.
    pub holes: u64,
}

/// A running `cairn export`, stopped (SIGINT) and reaped on drop.
pub struct Export {
    pub child: Child,
    pub uri: String,
    /// The first JSON value it printed.
    pub first: serde_json::Value,
    stdout: ChildStdout,
}

impl Export {
    /// Starts `command` (a `cairn ... export ... --json`) and waits for its URI line.
    pub fn start(mut command: Command) -> Result<Export> {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut stdout = child.stdout.take().expect("piped");
        // The first JSON value is {"serving": URI, ...}; serde_json reads an unbuffered
        // reader a byte at a time, so nothing after it is taken from the pipe.
        let first = serde_json::Deserializer::from_reader(&mut stdout)
            .into_iter::<serde_json::Value>()
            .next();
        let value = match first {
            Some(Ok(value)) => value,
            _ => {
                let mut err = String::new();
                child
                    .stderr
                    .take()
                    .expect("piped")
                    .read_to_string(&mut err)?;
                bail!("export exited before serving: {}", err.trim());
            }
        };
        // `cairn export` says "serving", `cairn vm start` names its "export".
        let uri = value["serving"]
            .as_str()
            .or(value["export"].as_str())
            .context("no URI")?
            .to_owned();
        Ok(Export {
            child,
            uri,
            stdout,
            first: value,
        })
    }

    /// Stops it as Ctrl-C does and returns its closing JSON summary.
    pub fn stop(self) -> Result<serde_json::Value> {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        self.finish()
    }

    /// Waits for it to exit by itself (bounded by the stdout read: the process closes it)
    /// and returns its closing JSON summary.
    pub fn finish(mut self) -> Result<serde_json::Value> {
        let mut rest = String::new();
        self.stdout.read_to_string(&mut rest)?;
        let status = self.child.wait()?;
        ensure!(status.success(), "export exited {status}");
        Ok(serde_json::from_str(rest.trim())?)
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
