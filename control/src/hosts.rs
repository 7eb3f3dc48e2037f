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
    /// The file as the router reaches it: `/proc/PID/root/etc/hosts` (the
    /// container's own, which Docker bind-mounts from its `HostsPath`).
    pub path: PathBuf,
    /// `db.meshnet.local db` for a host name with a domain, else the host name.
    pub names: String,
}

impl HostsFile {
    /// The `/etc/hosts` of the container whose main process is `pid`, with
    /// `Config.Hostname` and `Config.Domainname` as Docker gives them.
    pub fn of(pid: u32, hostname: &str, domainname: &str) -> HostsFile {
        HostsFile { path: PathBuf::from(format!("/proc/{pid}/root/etc/hosts")), names: host_names(hostname, domainname) }
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
    write_in_place(&file.path, &contents(&file.names, ips, extra))
}

fn write_in_place(path: &Path, text: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    f.write_all(text.as_bytes()).with_context(|| format!("write {}", path.display()))?;
    Ok(())
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
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("hosts");
        std::fs::write(&path, "127.0.0.1 localhost\n172.17.0.2 abc\n".repeat(20)).unwrap();
        let before = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path).unwrap());
        let file = HostsFile { path: path.clone(), names: "abc".into() };
        rewrite(&file, &["10.32.0.5".parse().unwrap()], &[]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, contents("abc", &["10.32.0.5".parse().unwrap()], &[]));
        assert_eq!(std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path).unwrap()), before, "not in place");
        let missing = HostsFile { path: dir.join("nope/hosts"), names: "abc".into() };
        assert!(rewrite(&missing, &[], &[]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
