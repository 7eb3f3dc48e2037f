//! The state directory: everything a router must not lose across a crash or a
//! restart, and the rendezvous points (control socket, pid, log) that let every
//! CLI command find its router.
//!
//! Every file is written atomically (temporary file, fsync, rename, fsync of the
//! directory), so a crash mid-write leaves either the old or the new content.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use meshnet_proto::identity::Identity;
use meshnet_proto::trust::KeyBook;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/meshnet";

/// Paths inside one router's state directory.
#[derive(Clone, Debug)]
pub struct StateDir {
    pub root: PathBuf,
}

/// A container (or namespace) attached to the bridge, as remembered across restarts.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Attachment {
    /// What the user typed: netns name, PID or container name.
    pub target: String,
    /// How it was resolved: "netns", "pid" or "docker".
    pub kind: String,
    /// Namespace file used to enter it.
    pub ns_path: PathBuf,
    /// Inode of that namespace when attached: a PID reused by another process is not mistaken for it.
    pub ns_inode: u64,
    /// Host-side veth name.
    pub host_if: String,
    /// Addresses as `ip/prefix`.
    pub addrs: Vec<String>,
    /// Interface name inside the target when not the default `ethwe` (CNI's `CNI_IFNAME`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ifname: Option<String>,
    /// Full Docker container ID, for kind "docker": its death releases the attachment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// Attached with `--no-multicast-route`: no `224.0.0.0/4` route through the interface.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_multicast_route: bool,
    /// Attached with `--without-dns`: a Docker container whose names are not
    /// registered in meshnet DNS, also when the router attaches it again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub without_dns: bool,
    /// Attached with `--rewrite-hosts`: its `--add-host` entries (HOST:IP);
    /// the container's `/etc/hosts` is written again when the router attaches it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite_hosts: Option<Vec<String>>,
    /// A Docker container attached by name whose DNS names may be missing:
    /// written with the record that `attach` saves before the interface and
    /// cleared once the names are registered, and set by `detach` before it
    /// removes them. A launch registers the names of a running container whose
    /// record says so (a crash came in between: they would never come back).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dns_pending: bool,
}

/// An address of this host on the overlay (`meshnet expose`), on the bridge.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Exposure {
    /// `ip/prefix`, the prefix of the subnet it was allocated in.
    pub addr: String,
    /// Whether traffic from its subnet to the outside is masqueraded
    /// (off with `expose --without-masquerade`).
    pub masquerade: bool,
}

/// Devices the router created, so `reset` removes exactly those.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Devices {
    pub bridge: String,
    pub bridge_created: bool,
    /// The router's port on the bridge: the TAP, or with `--datapath pcap` the
    /// capture veth's end (deleting it deletes the pair).
    pub tap: String,
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        StateDir { root: root.into() }
    }

    pub fn socket(&self) -> PathBuf {
        self.root.join("meshnet.sock")
    }
    pub fn log(&self) -> PathBuf {
        self.root.join("meshnet.log")
    }
    pub fn pid(&self) -> PathBuf {
        self.root.join("meshnet.pid")
    }
    fn identity_path(&self) -> PathBuf {
        self.root.join("identity")
    }
    fn targets_path(&self) -> PathBuf {
        self.root.join("targets.json")
    }
    fn attachments_path(&self) -> PathBuf {
        self.root.join("attachments.json")
    }
    /// The IPAM snapshot (ring, consensus state, allocations).
    pub fn ipam(&self) -> PathBuf {
        self.root.join("ipam.bin")
    }
    /// The IPv6 ring's IPAM snapshot (when an IPv6 `--ipalloc-range` is given).
    pub fn ipam6(&self) -> PathBuf {
        self.root.join("ipam6.bin")
    }
    fn exposed_path(&self) -> PathBuf {
        self.root.join("exposed.json")
    }
    fn devices_path(&self) -> PathBuf {
        self.root.join("devices.json")
    }
    /// The Docker plugin's pools, networks and endpoints (see `crate::plugin`).
    pub fn docker_plugin(&self) -> PathBuf {
        self.root.join("docker-plugin.json")
    }

    /// This router's own DNS records and their version (see `crate::dns`).
    pub fn dns_path(&self) -> PathBuf {
        self.root.join("dns.json")
    }

    /// Peer names pinned to their keys (see `meshnet_proto::trust`).
    pub fn keys_path(&self) -> PathBuf {
        self.root.join("keys.json")
    }

    /// Creates the directory (mode 0700) if needed.
    pub fn ensure(&self) -> Result<()> {
        fs::create_dir_all(&self.root)
            .with_context(|| format!("create state directory {}", self.root.display()))?;
        fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("set permissions on {}", self.root.display()))?;
        Ok(())
    }

    /// Removes the temporary files of [`write_atomic`] left by a process that
    /// died mid-write (`.NAME.tmpPID.SEQ`, PID no longer running): a router
    /// killed often would otherwise gather them. Returns how many went.
    pub fn remove_stale_temporaries(&self) -> usize {
        let Ok(entries) = fs::read_dir(&self.root) else { return 0 };
        let mut removed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(temporary_writer) else { continue };
            if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() && fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        removed
    }

    /// Removes the state directory and everything in it (`reset`). A directory
    /// that is a mount point (a router container's volume) cannot go itself:
    /// it is left empty.
    pub fn remove(&self) -> Result<()> {
        let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
        let entries = match fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) if gone(&e) => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("read state directory {}", self.root.display())),
        };
        for entry in entries {
            let entry = entry.with_context(|| format!("read state directory {}", self.root.display()))?;
            let path = entry.path();
            let removed = match entry.file_type() {
                Ok(t) if t.is_dir() => fs::remove_dir_all(&path),
                _ => fs::remove_file(&path),
            };
            match removed {
                Err(e) if !gone(&e) => return Err(e).with_context(|| format!("remove {}", path.display())),
                _ => {}
            }
        }
        match fs::remove_dir(&self.root) {
            Err(e) if !gone(&e) && e.kind() != std::io::ErrorKind::ResourceBusy => {
                Err(e).with_context(|| format!("remove state directory {}", self.root.display()))
            }
            _ => Ok(()),
        }
    }

    /// Loads the peer identity, creating and persisting a new one on first use.
    /// A corrupt one is an error, never replaced (the peer's name is its key).
    pub fn identity(&self) -> Result<Identity> {
        let path = self.identity_path();
        match fs::read_to_string(&path) {
            Ok(text) => {
                // The private key is for this user alone: a file others may read
                // (copied in, restored from a backup) is made 0600 again, saying so.
                if let Ok(meta) = fs::metadata(&path) {
                    let mode = meta.permissions().mode() & 0o777;
                    if mode & 0o077 != 0 {
                        fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
                            .with_context(|| format!("identity file {} has mode {mode:o}; make it 0600", path.display()))?;
                        log::warn!("identity file {} had mode {mode:o}: made it 0600 (it holds the private key)", path.display());
                    }
                }
                let bytes = decode_hex(text.trim())
                    .map_err(|e| anyhow::anyhow!("identity file {} is corrupt: {e} ({IDENTITY_ADVICE})", path.display()))?;
                let private: [u8; 32] = bytes.try_into().map_err(|_| {
                    anyhow::anyhow!("identity file {} is corrupt: expected 32 bytes ({IDENTITY_ADVICE})", path.display())
                })?;
                Identity::from_private(private)
                    .map_err(|e| anyhow::anyhow!("identity file {}: {e}", path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = Identity::generate();
                write_atomic(&path, encode_hex(&id.private).as_bytes(), 0o600)?;
                Ok(id)
            }
            Err(e) => Err(e).with_context(|| format!("read identity {}", path.display())),
        }
    }

    pub fn load_targets(&self) -> Result<Vec<String>> {
        Ok(read_json(&self.targets_path(), "it lists the peers to connect to: move it away to launch without them, then `meshnet connect` them again")?.unwrap_or_default())
    }
    pub fn save_targets(&self, targets: &[String]) -> Result<()> {
        write_json(&self.targets_path(), &targets)
    }
    /// Targets removed (`forget`, `connect --replace`) since the last
    /// `meshnet stop`: a launch that names one again after a crash, a `kill`
    /// or a restart by Docker or systemd (the same command line) leaves it
    /// out, as Weave's restart kept its persisted peers. Only a filter: an
    /// unreadable file filters nothing.
    pub fn load_forgotten(&self) -> Vec<String> {
        read_json(&self.root.join("forgotten.json"), "").ok().flatten().unwrap_or_default()
    }
    pub fn save_forgotten(&self, forgotten: &[String]) -> Result<()> {
        let path = self.root.join("forgotten.json");
        if forgotten.is_empty() {
            return match fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
                _ => Ok(()),
            };
        }
        write_json(&path, &forgotten)
    }
    pub fn load_attachments(&self) -> Result<Vec<Attachment>> {
        Ok(read_json(&self.attachments_path(), "it lists the targets attached here: move it away to launch without them, then attach them again")?.unwrap_or_default())
    }
    pub fn save_attachments(&self, a: &[Attachment]) -> Result<()> {
        write_json(&self.attachments_path(), &a)
    }
    pub fn load_exposed(&self) -> Result<Vec<Exposure>> {
        Ok(read_json(&self.exposed_path(), "it lists the host's addresses on the overlay: move it away to launch without them, then `meshnet expose` again")?.unwrap_or_default())
    }
    pub fn save_exposed(&self, e: &[Exposure]) -> Result<()> {
        write_json(&self.exposed_path(), &e)
    }
    pub fn load_devices(&self) -> Result<Option<Devices>> {
        read_json(&self.devices_path(), "it says which devices this router made: move it away to launch (`reset` then leaves the bridge in place)")
    }
    pub fn save_devices(&self, d: &Devices) -> Result<()> {
        write_json(&self.devices_path(), d)
    }

    /// The key book; empty when there is none yet. A corrupt file is an error:
    /// silently starting afresh would unpin every name.
    pub fn load_keys(&self) -> Result<KeyBook> {
        let path = self.keys_path();
        let book: Option<KeyBook> = read_json(&path, "names pinned to keys; move it away to forget every pin")?;
        Ok(book.unwrap_or_default())
    }
    pub fn save_keys(&self, book: &KeyBook) -> Result<()> {
        write_json(&self.keys_path(), book)
    }

    /// Our DNS records; none when there is no file yet. A corrupt file is an error.
    pub fn load_dns(&self) -> Result<crate::dns::OwnRecords> {
        Ok(read_json(&self.dns_path(), "it holds this router's DNS records: move it away to launch without them, then `meshnet dns-add` them again")?.unwrap_or_default())
    }
    pub fn save_dns(&self, own: &crate::dns::OwnRecords) -> Result<()> {
        write_json(&self.dns_path(), own)
    }

    /// The pid recorded by a running (or crashed) router, if any.
    pub fn recorded_pid(&self) -> Option<i32> {
        fs::read_to_string(self.pid()).ok()?.trim().parse().ok()
    }
}

/// The JSON file at `path`, None when there is none; a corrupt one is an error
/// that says what it held and what to do (`advice`).
/// What to do about a corrupt identity file.
const IDENTITY_ADVICE: &str = "it holds this router's private key: restore it from a backup, or move it away to launch as a new peer (the other peers then `meshnet rmpeer` the old name)";

fn read_json<T: DeserializeOwned>(path: &Path, advice: &str) -> Result<Option<T>> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("{} is corrupt: {e} ({advice})", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

fn write_json<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value)?;
    bytes.push(b'\n');
    write_atomic(path, &bytes, 0o600)
}

/// The process that writes temporary file `name` of [`write_atomic`], if it is one.
fn temporary_writer(name: &str) -> Option<u32> {
    let (stem, seq) = name.strip_prefix('.')?.rsplit_once('.')?;
    let (file, pid) = stem.rsplit_once(".tmp")?;
    if file.is_empty() || seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// Writes `bytes` to `path` so that a crash at any point leaves the old or the new
/// content, never a mix: temporary file, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    // One temporary name per call, not per process: two threads saving the
    // same file at once must not write into one temporary file.
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp{}.{seq}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("state"),
        std::process::id()
    ));
    let result = (|| -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(|| format!("write {}", path.display()))
}

pub fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn decode_hex(s: &str) -> Result<Vec<u8>> {
    if s.len() % 2 != 0 || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
        anyhow::bail!("not hex");
    }
    Ok((0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("checked hex"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> StateDir {
        let d = std::env::temp_dir().join(format!("meshnet-state-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        let s = StateDir::new(d);
        s.ensure().unwrap();
        s
    }

    #[test]
    fn identity_is_created_once_and_kept() {
        let s = scratch("id");
        let a = s.identity().unwrap();
        let b = s.identity().unwrap();
        assert_eq!(a.public, b.public);
        assert_eq!(a.name(), b.name());
        fs::remove_dir_all(&s.root).unwrap();
    }

    #[test]
    fn identity_is_kept_for_this_user_alone() {
        let s = scratch("idmode");
        let a = s.identity().unwrap();
        let path = s.root.join("identity");
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(s.identity().unwrap().public, a.public);
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        fs::remove_dir_all(&s.root).unwrap();
    }

    #[test]
    fn corrupt_identity_is_an_error_not_a_new_identity() {
        let s = scratch("badid");
        fs::write(s.root.join("identity"), "zz").unwrap();
        let err = format!("{:#}", s.identity().unwrap_err());
        assert!(err.contains("is corrupt") && err.contains("restore it from a backup"), "{err}");
        assert_eq!(fs::read_to_string(s.root.join("identity")).unwrap(), "zz");
        fs::remove_dir_all(&s.root).unwrap();
    }

    #[test]
    fn keys_round_trip_and_a_corrupt_key_book_is_an_error() {
        use meshnet_proto::trust::{Binding, Signer};
        let s = scratch("keys");
        assert!(s.load_keys().unwrap().is_empty());
        let id = Identity::generate();
        let mut book = KeyBook::new();
        book.admit(&Binding::new(id.name(), &id, &Signer::from_identity(&id))).unwrap();
        s.save_keys(&book).unwrap();
        assert_eq!(s.load_keys().unwrap(), book);
        fs::write(s.keys_path(), "{ not json").unwrap();
        let err = format!("{:#}", s.load_keys().unwrap_err());
        assert!(err.contains("keys.json is corrupt") && err.contains("move it away to forget every pin"), "{err}");
        assert_eq!(fs::read_to_string(s.keys_path()).unwrap(), "{ not json");
        // Every state file's error says what it held and what to do.
        for (file, load) in [
            ("targets.json", Box::new(|s: &StateDir| s.load_targets().map(|_| ())) as Box<dyn Fn(&StateDir) -> Result<()>>),
            ("attachments.json", Box::new(|s: &StateDir| s.load_attachments().map(|_| ()))),
            ("exposed.json", Box::new(|s: &StateDir| s.load_exposed().map(|_| ()))),
            ("devices.json", Box::new(|s: &StateDir| s.load_devices().map(|_| ()))),
            ("dns.json", Box::new(|s: &StateDir| s.load_dns().map(|_| ()))),
        ] {
            fs::write(s.root.join(file), "[1,").unwrap();
            let err = format!("{:#}", load(&s).unwrap_err());
            assert!(err.contains(&format!("{file} is corrupt")) && err.contains("move it away"), "{err}");
        }
        fs::remove_dir_all(&s.root).unwrap();
    }

    #[test]
    fn targets_and_attachments_round_trip() {
        let s = scratch("rt");
        assert!(s.load_targets().unwrap().is_empty());
        s.save_targets(&["10.0.0.1:6783".into()]).unwrap();
        assert_eq!(s.load_targets().unwrap(), vec!["10.0.0.1:6783".to_string()]);
        let a = Attachment {
            target: "c1".into(),
            kind: "netns".into(),
            ns_path: "/run/netns/c1".into(),
            ns_inode: 7,
            host_if: "vmesh1".into(),
            addrs: vec!["10.40.0.1/16".into()],
            ifname: None,
            container_id: None,
            no_multicast_route: true,
            without_dns: true,
            rewrite_hosts: Some(vec!["static:10.9.9.9".into()]),
            dns_pending: true,
        };
        s.save_attachments(std::slice::from_ref(&a)).unwrap();
        assert_eq!(s.load_attachments().unwrap(), vec![a]);
        let leftovers: Vec<_> = fs::read_dir(&s.root)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
        fs::remove_dir_all(&s.root).unwrap();
    }

    /// `attachments.json` of a build before `attach --without-dns` (no
    /// `without_dns` key) still reads: its containers keep their DNS names. A
    /// flag that is off is not written, so such a file reads the same in the older build.
    #[test]
    fn attachments_of_the_previous_build_read_and_without_dns_is_kept() {
        let s = scratch("olddns");
        let old = r#"[{"target":"web","kind":"docker","ns_path":"/proc/42/ns/net","ns_inode":9,"host_if":"vmn00000009","addrs":["10.32.0.5/12"],"container_id":"3f4e"}]"#;
        fs::write(s.root.join("attachments.json"), old).unwrap();
        let read = s.load_attachments().unwrap();
        assert_eq!(read.len(), 1);
        assert!(!read[0].without_dns && !read[0].no_multicast_route && read[0].rewrite_hosts.is_none());
        s.save_attachments(&read).unwrap();
        let written = fs::read_to_string(s.root.join("attachments.json")).unwrap();
        assert!(!written.contains("without_dns") && !written.contains("rewrite_hosts"), "{written}");
        let mut quiet = read[0].clone();
        quiet.without_dns = true;
        s.save_attachments(std::slice::from_ref(&quiet)).unwrap();
        assert!(s.load_attachments().unwrap()[0].without_dns);
        fs::remove_dir_all(&s.root).unwrap();
    }

    #[test]
    fn temporaries_of_dead_writers_are_removed_and_nothing_else() {
        let s = scratch("stale");
        // A pid that runs no process (above the kernel's pid_max of 2^22).
        let dead = 4_194_399u32;
        let live = std::process::id();
        let parent = std::os::unix::process::parent_id();
        let names = [
            format!(".attachments.json.tmp{dead}.16"),
            format!(".ipam.bin.tmp{dead}.3"),
            format!(".ipam.bin.tmp{live}.4"),
            format!(".dns.json.tmp{parent}.1"),
            "attachments.json".to_string(),
            ".tmp1.2".to_string(),
            format!(".x.tmp{dead}.notanumber"),
        ];
        for n in &names {
            fs::write(s.root.join(n), "x").unwrap();
        }
        assert_eq!(temporary_writer(&format!(".ipam.bin.tmp{dead}.3")), Some(dead));
        assert_eq!(s.remove_stale_temporaries(), 2);
        let mut left: Vec<String> =
            fs::read_dir(&s.root).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into()).collect();
        left.sort();
        let mut want: Vec<String> = names[2..].to_vec();
        want.sort();
        assert_eq!(left, want);
        fs::remove_dir_all(&s.root).unwrap();
    }

    #[test]
    fn concurrent_writers_of_one_file_each_write_whole() {
        let s = scratch("concurrent");
        s.ensure().unwrap();
        let path = s.root.join("shared.json");
        let writers: Vec<_> = (0..8u8)
            .map(|i| {
                let path = path.clone();
                std::thread::spawn(move || {
                    // Lengths differ so a mix of two writes is visible.
                    let body = vec![b'a' + i; 1000 + 997 * i as usize];
                    for _ in 0..50 {
                        write_atomic(&path, &body, 0o600).unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let got = fs::read(&path).unwrap();
        let i = got[0] - b'a';
        assert_eq!(got, vec![got[0]; 1000 + 997 * i as usize]);
        let leftovers = fs::read_dir(&s.root)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
            .count();
        assert_eq!(leftovers, 0);
        fs::remove_dir_all(&s.root).unwrap();
    }
}
