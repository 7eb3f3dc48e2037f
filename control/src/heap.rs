//! The router's heap. A router's working set is small (a few KiB per peer at
//! rest) but forming a mesh passes bursts through it: whole topologies to new
//! neighbours, hundreds of kilobytes each, on many connections at once. With
//! glibc's defaults those bursts stay resident afterwards: its mmap threshold
//! rises to the largest block ever freed, so later large messages come from
//! the arenas, and freed arena memory below the top is never given back. A
//! router in a forming mesh of 100 held 21–26 MiB of anonymous memory at rest,
//! 4–8 MiB of it free chunks (measured with `malloc_trim` through gdb).
//!
//! [`tune`] fixes the threshold (blocks of 64 KiB and more are mapped and
//! unmapped on their own) and [`trim_loop`] gives free pages back every
//! [`TRIM_EVERY`]. Other C libraries: nothing to do.

use std::time::Duration;

/// How often free heap pages go back to the kernel.
pub const TRIM_EVERY: Duration = Duration::from_secs(30);

/// Blocks this large or larger get their own mapping.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 64 * 1024;

/// Called once at the start of the router, before its threads.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters (glibc takes the arena lock).
    unsafe {
        if libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 {
            log::debug!("mallopt(M_MMAP_THRESHOLD) refused");
        }
    }
}

/// Gives free heap pages back to the kernel now.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim is thread-safe (it takes each arena's lock).
    unsafe {
        libc::malloc_trim(0);
    }
}

/// [`trim`] every [`TRIM_EVERY`], on a blocking thread (it walks every arena).
pub async fn trim_loop() {
    loop {
        tokio::time::sleep(TRIM_EVERY).await;
        // (Err: the trim panicked, which the panic message said; the next one runs anyway.)
        let _ = tokio::task::spawn_blocking(trim).await;
    }
}
