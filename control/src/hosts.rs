//! `attach --rewrite-hosts [--add-host HOST:IP ...]` (Weave's options): a
//! Docker container's `/etc/hosts` rewritten so its host name maps to its
//! addresses on the overlay, plus the extra hosts given, as `weave attach
//! --rewrite-hosts` wrote it.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// A container's `/etc/hosts`, and the names its addresses get there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostsFile {
    /// The container's root as the router reaches it: `/proc/PID/root`. Its
    /// `etc/hosts` (which Docker bind-mounts from its `HostsPath`) is opened
    /// with every symbolic link resolved inside this root, so a container
    /// cannot point the router's write at a file of the host.
    pub root: PathBuf,
    /// `db.meshnet.local db` for a host name with a domain, else the host name.
    pub names: String,
}

impl HostsFile {
    /// The `/etc/hosts` of the container whose main process is `pid`, with
    /// `Config.Hostname` and `Config.Domainname` as Docker gives them.
    pub fn of(pid: u32, hostname: &str, domainname: &str) -> HostsFile {
        HostsFile { root: PathBuf::from(format!("/proc/{pid}/root")), names: host_names(hostname, domainname) }
    }
}

/// The names of the container's own lines, as Weave wrote them: the full name
/// and its first label (`db.meshnet.local db`) when the host name has a
/// domain, else the host name alone (Docker's default, the short ID).
pub fn host_names(hostname: &str, domainname: &str) -> String {
    match crate::docker::fqdn_of(hostname, domainname) {
        Some(fqdn) => {
            let short = fqdn.split('.').next().unwrap_or_default();
            format!("{fqdn} {short}")
        }
        None => hostname.trim_end_matches('.').to_string(),
    }
}

/// `--add-host HOST:IP` (Docker's and Weave's form; IPv6 after the first `:`).
pub fn parse_add_host(s: &str) -> Result<(String, IpAddr)> {
    let Some((host, ip)) = s.split_once(':') else { bail!("--add-host {s:?}: expected HOST:IP") };
    let ip: IpAddr = ip.trim_matches(|c| c == '[' || c == ']').parse().with_context(|| format!("--add-host {s:?}: {ip:?} is not an IP address"))?;
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if host.is_empty() || !host.chars().all(ok) || host.starts_with(['.', '-']) {
        bail!("--add-host {s:?}: {host:?} is not a host name (letters, digits, '-', '_', '.')");
    }
    Ok((host.to_string(), ip))
}

/// The whole file: the container's addresses with its names, the extra
/// hosts, and the usual localhost lines.
pub fn contents(names: &str, ips: &[IpAddr], extra: &[(String, IpAddr)]) -> String {
    let mut s = String::from("# created by meshnet - BEGIN\n# container hostname\n");
    for ip in ips {
        s.push_str(&format!("{:<15} {names}\n", ip.to_string()));
    }
    s.push_str("\n# static names added with --add-host\n");
    for (host, ip) in extra {
        s.push_str(&format!("{:<15} {host}\n", ip.to_string()));
    }
    s.push_str(concat!(
        "\n# default localhost entries\n",
        "127.0.0.1       localhost\n",
        "::1             ip6-localhost ip6-loopback\n",
        "fe00::0         ip6-localnet\n",
        "ff00::0         ip6-mcastprefix\n",
        "ff02::1         ip6-allnodes\n",
        "ff02::2         ip6-allrouters\n",
        "# created by meshnet - END\n",
    ));
    s
}

/// Writes [`contents`] into `file` in place (it is a bind mount: it cannot be
/// replaced by a rename).
pub fn rewrite(file: &HostsFile, ips: &[IpAddr], extra: &[(String, IpAddr)]) -> Result<()> {
    let path = file.root.join("etc/hosts");
    let mut f = open_in_root(&file.root, "etc/hosts").with_context(|| format!("open {}", path.display()))?;
    if !f.metadata().with_context(|| format!("stat {}", path.display()))?.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    f.set_len(0).with_context(|| format!("truncate {}", path.display()))?;
    f.write_all(contents(&file.names, ips, extra).as_bytes()).with_context(|| format!("write {}", path.display()))?;
    Ok(())
}

/// Opens `rel` under `root` for writing with `openat2(RESOLVE_IN_ROOT)`: a
/// symbolic link on the way (`/etc/hosts -> /etc/shadow`) is resolved as if
/// `root` were `/`, and a "magic" `/proc` link is refused. Non-blocking, so a
/// FIFO put there cannot hang the router (it is then refused as no regular file).
fn open_in_root(root: &Path, rel: &str) -> std::io::Result<std::fs::File> {
    use std::ffi::CString;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let dir = std::fs::File::open(root)?;
    let rel = CString::new(rel).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: open_how is plain integers, for which all zeroes is valid (mode 0).
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_WRONLY | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2 reads the NUL-terminated path and `how` (of the size
    // given) and returns a new descriptor or -1; both pointers outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            rel.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a descriptor openat2 just returned to us alone.
    Ok(std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_weaves() {
        assert_eq!(host_names("db.meshnet.local", ""), "db.meshnet.local db");
        assert_eq!(host_names("db", "meshnet.local"), "db.meshnet.local db");
        assert_eq!(host_names("3f4e5a6b7c8d", ""), "3f4e5a6b7c8d");
    }

    #[test]
    fn add_hosts_parse_or_are_clear_errors() {
        assert_eq!(parse_add_host("static.name:10.9.9.9").unwrap(), ("static.name".to_string(), "10.9.9.9".parse().unwrap()));
        assert_eq!(parse_add_host("v6:fd00::1").unwrap(), ("v6".to_string(), "fd00::1".parse().unwrap()));
        for bad in ["static", "static:10.9.9", ":10.9.9.9", "bad name:10.9.9.9", "-x:10.9.9.9"] {
            assert!(parse_add_host(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn contents_map_the_addresses_and_extra_hosts() {
        let ips: Vec<IpAddr> = vec!["10.32.0.5".parse().unwrap(), "fd32::5".parse().unwrap()];
        let text = contents("db.meshnet.local db", &ips, &[("static.name".into(), "10.9.9.9".parse().unwrap())]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines.contains(&"10.32.0.5       db.meshnet.local db"), "{text}");
        assert!(lines.contains(&"fd32::5         db.meshnet.local db"), "{text}");
        assert!(lines.contains(&"10.9.9.9        static.name"), "{text}");
        assert!(lines.contains(&"127.0.0.1       localhost"), "{text}");
        assert!(text.starts_with("# created by meshnet - BEGIN\n") && text.ends_with("# created by meshnet - END\n"));
    }

    #[test]
    fn rewrite_replaces_the_file_in_place() {
        let dir = std::env::temp_dir().join(format!("meshnet-hosts-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        let path = dir.join("etc/hosts");
        std::fs::write(&path, "127.0.0.1 localhost\n172.17.0.2 abc\n".repeat(20)).unwrap();
        let before = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path).unwrap());
        let file = HostsFile { root: dir.clone(), names: "abc".into() };
        rewrite(&file, &["10.32.0.5".parse().unwrap()], &[]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, contents("abc", &["10.32.0.5".parse().unwrap()], &[]));
        assert_eq!(std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path).unwrap()), before, "not in place");
        let missing = HostsFile { root: dir.join("nope"), names: "abc".into() };
        assert!(rewrite(&missing, &[], &[]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A container that makes its `/etc/hosts` a link to a file of the host
    /// (an absolute link, or one climbing out with `..`) gets that link
    /// resolved inside its own root: the host's file is never written. A FIFO
    /// is refused at once rather than blocking the router.
    #[test]
    fn links_and_fifos_in_the_container_do_not_reach_the_host() {
        let base = std::env::temp_dir().join(format!("meshnet-hosts-escape-{}", std::process::id()));
        let (root, outside) = (base.join("root"), base.join("host-secret"));
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(&outside, "secret\n").unwrap();
        let file = HostsFile { root: root.clone(), names: "abc".into() };
        let hosts = root.join("etc/hosts");
        let ips: Vec<IpAddr> = vec!["10.32.0.5".parse().unwrap()];
        for target in [outside.clone(), PathBuf::from("../../host-secret")] {
            let _ = std::fs::remove_file(&hosts);
            std::os::unix::fs::symlink(&target, &hosts).unwrap();
            assert!(rewrite(&file, &ips, &[]).is_err(), "a link to {} was followed", target.display());
            assert_eq!(std::fs::read_to_string(&outside).unwrap(), "secret\n", "the host's file was written through {}", target.display());
        }
        std::fs::remove_file(&hosts).unwrap();
        let fifo = std::ffi::CString::new(hosts.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let t = std::time::Instant::now();
        assert!(rewrite(&file, &ips, &[]).is_err(), "a FIFO taken as /etc/hosts");
        assert!(t.elapsed() < std::time::Duration::from_secs(2));
        std::fs::remove_dir_all(&base).unwrap();
    }
}
