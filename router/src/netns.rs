//! Network namespaces: naming one, and running work inside it.
//!
//! `setns(2)` with `CLONE_NEWNET` changes the namespace of the *calling thread*
//! only, so every piece of work that must happen in another namespace runs on a
//! fresh thread that enters it, does the work, and exits. That thread never goes
//! back to serve anything else, so a namespace switch can never leak into the
//! caller, a thread pool, or an async runtime. Threads it spawns (for example
//! the helper thread behind each [`crate::netlink`] call) inherit its namespace.
//!
//! This module owns no devices and never changes anything in a namespace itself.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

/// Where `ip netns add NAME` pins named namespaces.
const NAMED_DIR: &str = "/run/netns";

/// Something went wrong naming or entering a namespace. Each message names the
/// namespace by its label ("netns c1", "pid 1234"), and holds its cause, which
/// is therefore not also chained as a `source`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetnsError {
    /// The namespace file does not exist (no such `ip netns`, or the process is gone).
    #[error("{label}: no such namespace ({path})")]
    NotFound { label: String, path: PathBuf },
    /// The name cannot be a file under /run/netns.
    #[error("netns {name:?}: not a valid namespace name")]
    InvalidName { name: String },
    /// The namespace file exists but could not be opened or read.
    #[error("open {label} ({path}): {cause}")]
    Open {
        label: String,
        path: PathBuf,
        cause: std::io::Error,
    },
    /// `setns` refused (not a network namespace, or not permitted).
    #[error("enter {label}: {cause}")]
    Enter {
        label: String,
        cause: std::io::Error,
    },
    /// The thread that would enter the namespace could not be started.
    #[error("start a thread for {label}: {cause}")]
    Thread {
        label: String,
        cause: std::io::Error,
    },
}

/// A network namespace to act in: a file such as /run/netns/NAME or /proc/PID/ns/net.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Netns {
    /// The namespace file; opening it gives a descriptor for `setns`.
    pub path: PathBuf,
    /// How errors name it: "netns c1" or "pid 1234".
    pub label: String,
}

impl Netns {
    /// The namespace that `ip netns add NAME` created; /run/netns/NAME must exist.
    pub fn named(name: &str) -> Result<Netns, NetnsError> {
        if name.is_empty()
            || name == "."
            || name == ".."
            || name.contains('/')
            || name.contains('\0')
        {
            return Err(NetnsError::InvalidName {
                name: name.to_string(),
            });
        }
        Netns::existing(PathBuf::from(NAMED_DIR).join(name), format!("netns {name}"))
    }

    /// The namespace process `pid` lives in; /proc/PID/ns/net must exist.
    pub fn of_pid(pid: u32) -> Result<Netns, NetnsError> {
        Netns::existing(
            PathBuf::from(format!("/proc/{pid}/ns/net")),
            format!("pid {pid}"),
        )
    }

    fn existing(path: PathBuf, label: String) -> Result<Netns, NetnsError> {
        match path.try_exists() {
            Ok(true) => Ok(Netns { path, label }),
            Ok(false) => Err(NetnsError::NotFound { label, path }),
            Err(source) => Err(NetnsError::Open {
                label,
                path,
                cause: source,
            }),
        }
    }

    /// The namespace's inode number: two `Netns` with the same inode are the same
    /// namespace (compare with `/proc/self/ns/net` to ask "is this mine?").
    pub fn inode(&self) -> Result<u64, NetnsError> {
        std::fs::metadata(&self.path)
            .map(|m| m.ino())
            .map_err(|e| self.open_error(e))
    }

    /// Open the namespace file, for `setns` or for moving a link by descriptor.
    pub(crate) fn open(&self) -> Result<File, NetnsError> {
        File::open(&self.path).map_err(|e| self.open_error(e))
    }

    fn open_error(&self, source: std::io::Error) -> NetnsError {
        if source.kind() == std::io::ErrorKind::NotFound {
            NetnsError::NotFound {
                label: self.label.clone(),
                path: self.path.clone(),
            }
        } else {
            NetnsError::Open {
                label: self.label.clone(),
                path: self.path.clone(),
                cause: source,
            }
        }
    }
}

/// Run `f` on a fresh thread that has entered `ns` (setns CLONE_NEWNET); join and return its result.
///
/// The namespace file is opened on the calling thread, so a missing namespace is
/// reported before any thread starts. A panic inside `f` is propagated to the
/// caller unchanged (it is a bug in `f`, not a namespace failure).
pub fn run_in<T: Send + 'static>(
    ns: &Netns,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, NetnsError> {
    let file = ns.open()?;
    let label = ns.label.clone();
    let thread_label = label.clone();
    let handle = std::thread::Builder::new()
        .name(thread_name(&label))
        .spawn(move || -> Result<T, NetnsError> {
            // SAFETY: `file` is an open descriptor we own for the whole call;
            // setns only reads it.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(NetnsError::Enter {
                    label: thread_label,
                    cause: std::io::Error::last_os_error(),
                });
            }
            drop(file);
            Ok(f())
        })
        .map_err(|source| NetnsError::Thread { label, cause: source })?;
    match handle.join() {
        Ok(result) => result,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Thread names are capped at 15 bytes by the kernel; keep the useful tail.
fn thread_name(label: &str) -> String {
    let name = format!("ns:{}", label.rsplit(' ').next().unwrap_or(label));
    name.chars().take(15).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_rejects_paths() {
        for bad in ["", ".", "..", "a/b", "../etc"] {
            assert!(
                matches!(Netns::named(bad), Err(NetnsError::InvalidName { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn missing_named_namespace_is_not_found_and_says_so() {
        let err = Netns::named("meshnet-surely-absent-ns").unwrap_err();
        assert!(matches!(err, NetnsError::NotFound { .. }));
        assert_eq!(
            err.to_string(),
            "netns meshnet-surely-absent-ns: no such namespace (/run/netns/meshnet-surely-absent-ns)"
        );
    }

    #[test]
    fn own_pid_namespace_matches_self() {
        let me = Netns::of_pid(std::process::id()).unwrap();
        let selfns = Netns {
            path: "/proc/self/ns/net".into(),
            label: "self".into(),
        };
        assert_eq!(me.inode().unwrap(), selfns.inode().unwrap());
        assert_eq!(me.label, format!("pid {}", std::process::id()));
    }

    #[test]
    fn thread_names_fit() {
        assert!(thread_name("netns a-very-long-namespace-name").len() <= 15);
        assert_eq!(thread_name("pid 1234"), "ns:1234");
    }
}
