//! The data dir: one site's keys, its local store and the lock that keeps a second process
//! out. Layout, format 2:
//!
//! ```text
//! FORMAT          "cairn data dir format 2": written last by init, read first by open
//! JOINING         present while the dir waits for `cairn join TOKEN`: until then it holds
//!                 only FORMAT, this marker and keys/node.key; removed last by join
//! site.json       site name and public site key
//! keys/site.key   ed25519 secret key, hex (mode 0600)
//! keys/vault.key  256-bit vault key, hex (mode 0600)
//! keys/node.key   this machine's ed25519 node key, hex (mode 0600); never copied
//! keys/recovery.key  the recovery key, hex (mode 0600), for `cairn key recovery-sheet`;
//!                 only on the machine that made the site (or recovered it)
//! wrapped-keys.rec   signed record: site and vault keys sealed under the recovery key
//! store/          pack files and the sled index (see store.rs)
//! lock            held with flock by whichever process has the store open
//! ```
//!
//! Format 2 adds the store's `retired-pack/` catalog keys (store/repack.rs), which a
//! format 1 reader would not finish before scanning packs. From 1: nothing to convert, so
//! a writable format 1 dir is marked 2 when it is opened, before its store is; a
//! read-only one is read as it is (it has no such key, as no format 2 cairn wrote to it).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use cairn_protocol::identity::{NodeId, RecoveryKey, SiteId};
use cairn_protocol::ids::{hex, parse_hex};
use cairn_protocol::record::{is_valid_name, Record, RecordKind, NAME_BYTES_MAX};
use cairn_protocol::wrap::{KdfParams, WrappedKeys};
use cairn_protocol::VaultKey;
use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::units;

pub const DATA_DIR_FORMAT: u32 = 2;
const FORMAT_PREFIX: &str = "cairn data dir format ";
const WRAPPED_KEYS_FILE: &str = "wrapped-keys.rec";
const JOINING_FILE: &str = "JOINING";

#[derive(Debug, Error)]
pub enum DataDirError {
    #[error(
        "no cairn data dir at {0}: run `cairn init --site-name NAME` first, or pass --data-dir"
    )]
    Missing(PathBuf),
    #[error("{0} is already a cairn data dir; pick another --data-dir to start a new site")]
    AlreadyInitialized(PathBuf),
    #[error("{0} is waiting to join a site: finish with `cairn join TOKEN` (plain `cairn join` shows this machine's node id)")]
    Joining(PathBuf),
    #[error(
        "{0} already belongs to a site; to join one from this machine, pass another --data-dir"
    )]
    AlreadyMember(PathBuf),
    #[error("no data dir waiting to join at {0}: run `cairn join` without a token first, and have a node of the site add the node id it prints")]
    NotJoining(PathBuf),
    #[error("data dir {path} has format {found}, newer than this cairn understands ({DATA_DIR_FORMAT}): upgrade cairn")]
    NewerFormat { path: PathBuf, found: u32 },
    #[error("data dir {path} is damaged: {why}")]
    Damaged { path: PathBuf, why: String },
    #[error("key file {path} is readable by other users (mode {mode:o}): run `chmod 600 {path}`")]
    KeyExposed { path: PathBuf, mode: u32 },
    #[error("data dir {path} is in use by another cairn process{holder}; wait for it to finish")]
    Locked { path: PathBuf, holder: String },
    #[error("invalid site name {0:?}: use 1 to {NAME_BYTES_MAX} printable bytes")]
    BadSiteName(String),
    #[error("cannot recover: {0}")]
    Recovery(String),
    #[error("{path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DataDirError + '_ {
    move |source| DataDirError::Io {
        path: path.to_owned(),
        source,
    }
}

#[derive(Serialize, Deserialize)]
struct SiteFile {
    site_name: String,
    site_public_key: String,
}

/// An open data dir. Holding one holds the lock; it is released on drop.
pub struct DataDir {
    root: PathBuf,
    pub site_name: String,
    pub site_key: SigningKey,
    pub vault_key: VaultKey,
    /// Absent only in data dirs made before recovery keys existed.
    pub recovery_key: Option<RecoveryKey>,
    /// This machine's own key: every machine of a site has its own (later its libp2p
    /// identity), made at init, at recovery, or on first open of an older data dir.
    pub node_key: SigningKey,
    /// True when the data dir cannot be written (a backup disk mounted read-only): the
    /// lock is then shared, and the store is opened for reading only.
    pub read_only: bool,
    _lock: Option<File>,
}

impl std::fmt::Debug for DataDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataDir")
            .field("root", &self.root)
            .field("site_name", &self.site_name)
            .finish()
    }
}

impl DataDir {
    /// Creates a new site in `root`, which must be absent or an empty directory.
    pub fn init(root: &Path, site_name: &str) -> Result<DataDir, DataDirError> {
        check_site_name(site_name)?;
        if root.join(JOINING_FILE).exists() {
            return Err(DataDirError::Joining(root.to_owned()));
        }
        if root.join("FORMAT").exists() {
            return Err(DataDirError::AlreadyInitialized(root.to_owned()));
        }
        if root.join("keys/vault.key").exists() {
            return Err(damaged(
                root,
                "it holds keys from an unfinished init; move it away before starting a new site",
            ));
        }
        refuse_non_empty(root)?;
        create_private_dir(root)?;
        let lock = lock(root)?;
        let site_key = SigningKey::from_bytes(&random_bytes());
        let vault_key = VaultKey::from_bytes(random_bytes());
        let recovery_key = RecoveryKey(random_bytes());
        write_keys(root, &site_key, &vault_key, Some(&recovery_key))?;
        write_wrapped_keys(root, &site_key, &vault_key, &recovery_key)?;
        write_site_file(root, site_name, &site_key)?;
        let node_key = node_key(root)?;
        write_format(root)?;
        Ok(DataDir {
            root: root.to_owned(),
            site_name: site_name.to_owned(),
            site_key,
            vault_key,
            recovery_key: Some(recovery_key),
            node_key,
            read_only: false,
            _lock: Some(lock),
        })
    }

    /// Brings a site's identity back from its wrapped-keys record and recovery key: into a
    /// data dir whose keys were lost (its store is kept), or into a new, empty one.
    pub fn recover(
        root: &Path,
        site: &SiteId,
        recovery_key: &RecoveryKey,
        wrapped_record: &[u8],
        site_name: Option<&str>,
    ) -> Result<DataDir, DataDirError> {
        let record = Record::decode(wrapped_record).map_err(|e| {
            DataDirError::Recovery(format!(
                "the wrapped-keys record is damaged: {}",
                units::chain(&e)
            ))
        })?;
        record.verify_signature().map_err(|_| {
            DataDirError::Recovery("the wrapped-keys record's signature does not verify".into())
        })?;
        if record.kind != RecordKind::WrappedKeys {
            return Err(DataDirError::Recovery(
                "that record does not hold wrapped keys".into(),
            ));
        }
        if record.author != *site {
            return Err(DataDirError::Recovery(format!(
                "those wrapped keys belong to site {}, not {site}",
                record.author
            )));
        }
        let wrapped = WrappedKeys::decode(&record.body).map_err(|e| {
            DataDirError::Recovery(format!(
                "the wrapped keys are damaged: {}",
                units::chain(&e)
            ))
        })?;
        let (site_secret, vault_key) = wrapped
            .unwrap(site, recovery_key)
            .map_err(|e| DataDirError::Recovery(units::chain(&e)))?;
        let site_key = SigningKey::from_bytes(&site_secret);
        if site_key.verifying_key().to_bytes() != site.0 {
            return Err(DataDirError::Recovery(
                "the wrapped site key does not match the site id".into(),
            ));
        }

        if root.join(JOINING_FILE).exists() {
            return Err(DataDirError::Joining(root.to_owned()));
        }
        let existing = root.join("FORMAT").exists();
        if existing && root.join("keys/site.key").exists() {
            return Err(DataDirError::Recovery(format!(
                "{} already holds this site's keys; there is nothing to recover",
                root.display()
            )));
        }
        if !existing && fs::read_dir(root).is_ok_and(|mut entries| entries.next().is_some()) {
            return Err(damaged(root, "it is not empty; recover into an empty or new directory, or into the data dir that lost its keys"));
        }
        create_private_dir(root)?;
        let lock = lock(root)?;
        let site_name = if existing {
            let site_file = read_site_file(root)?;
            if site_file.site_public_key != hex(&site.0) {
                return Err(DataDirError::Recovery(format!(
                    "{} belongs to another site",
                    root.display()
                )));
            }
            site_file.site_name
        } else {
            let name = site_name.unwrap_or("recovered site");
            check_site_name(name)?;
            write_site_file(root, name, &site_key)?;
            name.to_owned()
        };
        write_keys(root, &site_key, &vault_key, Some(recovery_key))?;
        write_durable(&root.join(WRAPPED_KEYS_FILE), wrapped_record)?;
        let node_key = node_key(root)?;
        if existing {
            upgrade_format(root)?;
        } else {
            write_format(root)?;
        }
        Ok(DataDir {
            root: root.to_owned(),
            site_name,
            site_key,
            vault_key,
            recovery_key: Some(recovery_key.clone()),
            node_key,
            read_only: false,
            _lock: Some(lock),
        })
    }

    /// Opens an existing data dir and takes its lock.
    pub fn open(root: &Path) -> Result<DataDir, DataDirError> {
        let Some(format) = read_format(root)? else {
            return Err(DataDirError::Missing(root.to_owned()));
        };
        if root.join(JOINING_FILE).exists() {
            return Err(DataDirError::Joining(root.to_owned()));
        }
        let (lock, read_only) = lock_or_share(root)?;
        if format < DATA_DIR_FORMAT && !read_only {
            upgrade_format(root)?;
        }
        let site = read_site_file(root)?;
        let site_key = SigningKey::from_bytes(&read_secret(root, &root.join("keys/site.key"))?);
        if hex(site_key.verifying_key().as_bytes()) != site.site_public_key {
            return Err(damaged(root, "keys/site.key does not match site.json"));
        }
        let vault_key = VaultKey::from_bytes(read_secret(root, &root.join("keys/vault.key"))?);
        let recovery_path = root.join("keys/recovery.key");
        let recovery_key = match recovery_path.exists() {
            true => Some(RecoveryKey(read_secret(root, &recovery_path)?)),
            false => None,
        };
        let node_key = node_key(root)?;
        Ok(DataDir {
            root: root.to_owned(),
            site_name: site.site_name,
            site_key,
            vault_key,
            recovery_key,
            node_key,
            read_only,
            _lock: lock,
        })
    }

    pub fn node_id(&self) -> NodeId {
        NodeId(self.node_key.verifying_key().to_bytes())
    }

    pub fn site_id(&self) -> SiteId {
        SiteId(self.site_key.verifying_key().to_bytes())
    }

    /// The signed wrapped-keys record, as stored at init (the mesh will carry it too).
    pub fn wrapped_keys_path(&self) -> PathBuf {
        self.root.join(WRAPPED_KEYS_FILE)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn store_dir(&self) -> PathBuf {
        self.root.join("store")
    }

    /// Ends a join: with the marker gone, every command opens this data dir.
    pub fn finish_join(&self) -> Result<(), DataDirError> {
        let marker = self.root.join(JOINING_FILE);
        fs::remove_file(&marker).map_err(io(&marker))?;
        sync_dir(&self.root)
    }
}

/// A data dir waiting to join a site: it has a node key and nothing of the site yet.
/// Holding one holds the lock.
pub struct JoiningDir {
    root: PathBuf,
    pub node_key: SigningKey,
    _lock: File,
}

impl JoiningDir {
    /// Makes `root` a data dir waiting to join, or opens the one already there, so running
    /// `cairn join` again shows the same node id and never makes a second key.
    pub fn begin(root: &Path) -> Result<JoiningDir, DataDirError> {
        let has_format = check_format(root)?;
        let has_marker = root.join(JOINING_FILE).exists();
        if has_format && !has_marker {
            return Err(DataDirError::AlreadyMember(root.to_owned()));
        }
        if !has_format && !has_marker {
            refuse_non_empty(root)?;
            create_private_dir(root)?;
        }
        let lock = lock(root)?;
        if check_format(root)? {
            return JoiningDir::locked(root, lock);
        }
        // A new dir, or a begin interrupted before FORMAT: its node id was never shown, so
        // a node key written in part can simply be made again.
        let stale = root.join("keys/node.key");
        if stale.exists() {
            fs::remove_file(&stale).map_err(io(&stale))?;
        }
        write_durable(
            &root.join(JOINING_FILE),
            b"waiting for `cairn join TOKEN`\n",
        )?;
        let node_key = node_key(root)?;
        write_format(root)?;
        Ok(JoiningDir {
            root: root.to_owned(),
            node_key,
            _lock: lock,
        })
    }

    /// Opens a data dir made by `begin` and takes its lock.
    pub fn open(root: &Path) -> Result<JoiningDir, DataDirError> {
        if !check_format(root)? {
            return Err(DataDirError::NotJoining(root.to_owned()));
        }
        if !root.join(JOINING_FILE).exists() {
            return Err(DataDirError::AlreadyMember(root.to_owned()));
        }
        JoiningDir::locked(root, lock(root)?)
    }

    fn locked(root: &Path, lock: File) -> Result<JoiningDir, DataDirError> {
        if !root.join(JOINING_FILE).exists() {
            return Err(DataDirError::AlreadyMember(root.to_owned()));
        }
        upgrade_format(root)?;
        Ok(JoiningDir {
            root: root.to_owned(),
            node_key: node_key(root)?,
            _lock: lock,
        })
    }

    pub fn node_id(&self) -> NodeId {
        NodeId(self.node_key.verifying_key().to_bytes())
    }

    /// Writes the site's keys and files. The JOINING marker stays until the caller has
    /// stored the rest (the node certificate) and calls `DataDir::finish_join`, so a crash
    /// at any point leaves a data dir that is either still joining or complete.
    pub fn write_site(
        self,
        site_name: &str,
        site_key: SigningKey,
        vault_key: VaultKey,
        wrapped_record: Option<&[u8]>,
    ) -> Result<DataDir, DataDirError> {
        check_site_name(site_name)?;
        let root = self.root;
        // Left by an attempt that crashed; the marker says nothing used them.
        for stale in ["keys/site.key", "keys/vault.key"] {
            let path = root.join(stale);
            if path.exists() {
                fs::remove_file(&path).map_err(io(&path))?;
            }
        }
        write_keys(&root, &site_key, &vault_key, None)?;
        if let Some(record) = wrapped_record {
            write_durable(&root.join(WRAPPED_KEYS_FILE), record)?;
        }
        write_site_file(&root, site_name, &site_key)?;
        sync_dir(&root)?;
        Ok(DataDir {
            root,
            site_name: site_name.to_owned(),
            site_key,
            vault_key,
            recovery_key: None,
            node_key: self.node_key,
            read_only: false,
            _lock: Some(self._lock),
        })
    }
}

/// Reads FORMAT: false when there is none, an error when it is unreadable or newer.
fn check_format(root: &Path) -> Result<bool, DataDirError> {
    Ok(read_format(root)?.is_some())
}

/// The format FORMAT names: None when there is none, an error when it is unreadable or
/// newer than this cairn.
fn read_format(root: &Path) -> Result<Option<u32>, DataDirError> {
    let format_path = root.join("FORMAT");
    let format = match fs::read_to_string(&format_path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(&format_path)(e)),
    };
    let found: u32 = format
        .trim()
        .strip_prefix(FORMAT_PREFIX)
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| damaged(root, "FORMAT file is unreadable"))?;
    if found > DATA_DIR_FORMAT {
        return Err(DataDirError::NewerFormat {
            path: root.to_owned(),
            found,
        });
    }
    Ok(Some(found))
}

fn refuse_non_empty(root: &Path) -> Result<(), DataDirError> {
    if fs::read_dir(root).is_ok_and(|mut entries| entries.next().is_some()) {
        return Err(damaged(
            root,
            "it is not empty; give an empty or new directory for the data dir",
        ));
    }
    Ok(())
}

/// This machine's node key, made on first use.
fn node_key(root: &Path) -> Result<SigningKey, DataDirError> {
    let path = root.join("keys/node.key");
    if path.exists() {
        return Ok(SigningKey::from_bytes(&read_secret(root, &path)?));
    }
    let key = SigningKey::from_bytes(&random_bytes());
    create_private_dir(&root.join("keys"))?;
    write_secret(&path, &key.to_bytes())?;
    sync_dir(&root.join("keys"))?;
    Ok(key)
}

fn check_site_name(site_name: &str) -> Result<(), DataDirError> {
    if !is_valid_name(site_name) {
        return Err(DataDirError::BadSiteName(site_name.to_owned()));
    }
    Ok(())
}

fn read_site_file(root: &Path) -> Result<SiteFile, DataDirError> {
    let path = root.join("site.json");
    serde_json::from_slice(&fs::read(&path).map_err(io(&path))?)
        .map_err(|e| damaged(root, &format!("site.json: {e}")))
}

fn write_site_file(
    root: &Path,
    site_name: &str,
    site_key: &SigningKey,
) -> Result<(), DataDirError> {
    let site = SiteFile {
        site_name: site_name.to_owned(),
        site_public_key: hex(site_key.verifying_key().as_bytes()),
    };
    write_durable(
        &root.join("site.json"),
        &serde_json::to_vec_pretty(&site).expect("site file serialises"),
    )
}

fn write_keys(
    root: &Path,
    site_key: &SigningKey,
    vault_key: &VaultKey,
    recovery_key: Option<&RecoveryKey>,
) -> Result<(), DataDirError> {
    let keys = root.join("keys");
    create_private_dir(&keys)?;
    write_secret(&keys.join("site.key"), &site_key.to_bytes())?;
    write_secret(&keys.join("vault.key"), vault_key.as_bytes())?;
    if let Some(recovery_key) = recovery_key {
        write_secret(&keys.join("recovery.key"), &recovery_key.0)?;
    }
    sync_dir(&keys)
}

fn write_wrapped_keys(
    root: &Path,
    site_key: &SigningKey,
    vault_key: &VaultKey,
    recovery_key: &RecoveryKey,
) -> Result<(), DataDirError> {
    let site = SiteId(site_key.verifying_key().to_bytes());
    let wrapped = WrappedKeys::wrap(
        &site,
        &site_key.to_bytes(),
        vault_key,
        recovery_key,
        KdfParams::RECOMMENDED,
        random_bytes(),
        random_bytes(),
    )
    .map_err(|e| damaged(root, &e.to_string()))?;
    let record = Record::sign(
        site_key,
        RecordKind::WrappedKeys,
        [0; 32],
        1,
        wrapped.encode(),
    );
    write_durable(&root.join(WRAPPED_KEYS_FILE), &record.encode())
}

/// Marks a data dir of an older format with this one, before anything of the newer format
/// is written to it. Every migration so far is a no-op (see the module doc), so only FORMAT
/// changes. The caller holds the lock.
fn upgrade_format(root: &Path) -> Result<(), DataDirError> {
    match read_format(root)? {
        Some(found) if found < DATA_DIR_FORMAT => write_format(root),
        _ => Ok(()),
    }
}

/// FORMAT goes last: a data dir without it is an interrupted init.
fn write_format(root: &Path) -> Result<(), DataDirError> {
    write_durable(
        &root.join("FORMAT"),
        format!("{FORMAT_PREFIX}{DATA_DIR_FORMAT}\n").as_bytes(),
    )?;
    sync_dir(root)
}

fn damaged(root: &Path, why: &str) -> DataDirError {
    DataDirError::Damaged {
        path: root.to_owned(),
        why: why.to_owned(),
    }
}

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    getrandom::getrandom(&mut out).expect("the OS random source is available");
    out
}

fn create_private_dir(path: &Path) -> Result<(), DataDirError> {
    match fs::create_dir_all(path) {
        Ok(()) => fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(io(path)),
        Err(e) => Err(io(path)(e)),
    }
}

/// The lock for opening a data dir that may be read-only. A dir that cannot be written
/// (EROFS, or no write permission) cannot be changed by this process, so a shared lock is
/// enough: it still waits out nothing and keeps out nothing but a writer that could only
/// exist on a writable mount. Answers the lock (none when a read-only dir has no lock
/// file) and whether the dir is read-only.
fn lock_or_share(root: &Path) -> Result<(Option<File>, bool), DataDirError> {
    match lock(root) {
        Ok(file) => Ok((Some(file), false)),
        Err(DataDirError::Io { source, .. }) if is_read_only(&source) => {
            let path = root.join("lock");
            let file = match File::open(&path) {
                Ok(file) => file,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((None, true)),
                Err(e) => return Err(io(&path)(e)),
            };
            match file.try_lock_shared() {
                Ok(()) => Ok((Some(file), true)),
                Err(std::fs::TryLockError::WouldBlock) => Err(DataDirError::Locked {
                    path: root.to_owned(),
                    holder: String::new(),
                }),
                Err(std::fs::TryLockError::Error(e)) => Err(io(&path)(e)),
            }
        }
        Err(other) => Err(other),
    }
}

fn is_read_only(error: &std::io::Error) -> bool {
    error.raw_os_error() == Some(libc::EROFS)
        || error.kind() == std::io::ErrorKind::PermissionDenied
}

fn lock(root: &Path) -> Result<File, DataDirError> {
    let path = root.join("lock");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io(&path))?;
    match file.try_lock() {
        Ok(()) => {
            file.set_len(0).map_err(io(&path))?;
            file.write_all(format!("{}\n", std::process::id()).as_bytes())
                .map_err(io(&path))?;
            Ok(file)
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let holder = match pid.trim() {
                "" => String::new(),
                pid => format!(" (pid {pid})"),
            };
            Err(DataDirError::Locked {
                path: root.to_owned(),
                holder,
            })
        }
        Err(std::fs::TryLockError::Error(e)) => Err(io(&path)(e)),
    }
}

fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), DataDirError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    file.write_all(format!("{}\n", hex(bytes)).as_bytes())
        .map_err(io(path))?;
    file.sync_all().map_err(io(path))
}

fn read_secret<const N: usize>(root: &Path, path: &Path) -> Result<[u8; N], DataDirError> {
    let meta = fs::metadata(path).map_err(io(path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(DataDirError::KeyExposed {
            path: path.to_owned(),
            mode,
        });
    }
    let text = fs::read_to_string(path).map_err(io(path))?;
    parse_hex::<N>("key", text.trim())
        .map_err(|e| damaged(root, &format!("{}: {e}", path.display())))
}

/// Writes a small file so that it is complete on disk before this returns.
pub fn write_durable(path: &Path, bytes: &[u8]) -> Result<(), DataDirError> {
    let tmp = path.with_extension("tmp");
    let mut file = File::create(&tmp).map_err(io(&tmp))?;
    file.write_all(bytes).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
}

pub fn sync_dir(path: &Path) -> Result<(), DataDirError> {
    File::open(path)
        .and_then(|dir| dir.sync_all())
        .map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_then_open_gives_the_same_keys() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("d");
        let created = DataDir::init(&root, "Main Street Office").unwrap();
        let (site, vault) = (created.site_key.to_bytes(), created.vault_key.clone());
        drop(created);
        let opened = DataDir::open(&root).unwrap();
        assert_eq!(opened.site_key.to_bytes(), site);
        assert_eq!(opened.vault_key, vault);
        assert_eq!(opened.site_name, "Main Street Office");
        let mode = fs::metadata(root.join("keys/vault.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_joining_dir_keeps_its_node_key_and_refuses_use_until_joined() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("d");
        let node = JoiningDir::begin(&root).unwrap().node_id();
        assert_eq!(JoiningDir::begin(&root).unwrap().node_id(), node);
        let mode = fs::metadata(root.join("keys/node.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(
            DataDir::open(&root),
            Err(DataDirError::Joining(_))
        ));
        assert!(matches!(
            DataDir::init(&root, "a"),
            Err(DataDirError::Joining(_))
        ));

        let site_key = SigningKey::from_bytes(&[1; 32]);
        let vault_key = VaultKey::from_bytes([2; 32]);
        let write = || {
            JoiningDir::open(&root)
                .unwrap()
                .write_site("Main St", site_key.clone(), vault_key.clone(), Some(b"rec"))
                .unwrap()
        };
        // Keys written but the join not finished (a crash here): still joining, and
        // joining again with the same token works.
        drop(write());
        assert!(matches!(
            DataDir::open(&root),
            Err(DataDirError::Joining(_))
        ));
        let dir = write();
        dir.finish_join().unwrap();
        drop(dir);

        let opened = DataDir::open(&root).unwrap();
        assert_eq!(opened.node_id(), node);
        assert_eq!(opened.site_key.to_bytes(), site_key.to_bytes());
        assert_eq!(opened.vault_key, vault_key);
        assert!(opened.recovery_key.is_none());
        assert_eq!(fs::read(opened.wrapped_keys_path()).unwrap(), b"rec");
        drop(opened);
        assert!(matches!(
            JoiningDir::begin(&root),
            Err(DataDirError::AlreadyMember(_))
        ));
        assert!(matches!(
            JoiningDir::open(&tmp.path().join("none")),
            Err(DataDirError::NotJoining(_))
        ));
    }

    #[test]
    fn a_second_opener_is_refused_while_the_first_holds_it() {
        let tmp = tempfile::tempdir().unwrap();
        let first = DataDir::init(tmp.path(), "a").unwrap();
        let err = DataDir::open(tmp.path()).unwrap_err();
        assert!(matches!(err, DataDirError::Locked { .. }), "{err}");
        assert!(err
            .to_string()
            .contains(&format!("pid {}", std::process::id())));
        drop(first);
        DataDir::open(tmp.path()).unwrap();
    }

    #[test]
    fn a_format_1_dir_opens_and_is_marked_format_2() {
        let tmp = tempfile::tempdir().unwrap();
        let made = DataDir::init(tmp.path(), "a").unwrap();
        let site = made.site_id();
        drop(made);
        let format = tmp.path().join("FORMAT");
        assert_eq!(
            fs::read_to_string(&format).unwrap(),
            "cairn data dir format 2\n"
        );
        fs::write(&format, "cairn data dir format 1\n").unwrap();
        let opened = DataDir::open(tmp.path()).unwrap();
        assert_eq!(opened.site_id(), site);
        assert_eq!(
            fs::read_to_string(&format).unwrap(),
            "cairn data dir format 2\n"
        );
    }

    #[test]
    fn newer_formats_and_exposed_keys_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        drop(DataDir::init(tmp.path(), "a").unwrap());
        fs::set_permissions(
            tmp.path().join("keys/vault.key"),
            fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        assert!(matches!(
            DataDir::open(tmp.path()),
            Err(DataDirError::KeyExposed { .. })
        ));
        fs::write(tmp.path().join("FORMAT"), "cairn data dir format 99\n").unwrap();
        assert!(matches!(
            DataDir::open(tmp.path()),
            Err(DataDirError::NewerFormat { found: 99, .. })
        ));
        assert!(matches!(
            DataDir::init(tmp.path(), "a"),
            Err(DataDirError::AlreadyInitialized(_))
        ));
    }
}
