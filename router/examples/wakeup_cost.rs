//! What a wake-up costs on this machine: the floor under an overlay's round
//! trip. Two threads ping-pong one byte over two pipes, one round every 10 ms
//! (as `ping -i 0.01` does), each blocked in `poll` as a forwarding thread is;
//! every round trip is two wake-ups. Three placements: the threads on two
//! CPUs (the other CPU idle between rounds), both on one CPU (a context
//! switch, no idle CPU to wake), and the answering thread busy polling (no
//! wake-up on its side). BENCHMARKS.md ("A floor for an encrypted user-space
//! path") uses these figures.
//!
//! cargo run --release -p meshnet-router --example wakeup_cost [-- ROUNDS]

use std::time::{Duration, Instant};

fn main() {
    let rounds: usize = std::env::args().nth(1).map_or(300, |a| a.parse().expect("ROUNDS: a number"));
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus >= 2 {
        report("two CPUs, both sleep in poll", rounds, (0, 1), false);
    }
    report("one CPU, both sleep in poll", rounds, (0, 0), false);
    if cpus >= 2 {
        report("two CPUs, the answering thread busy polls", rounds, (0, 1), true);
    }
}

fn report(what: &str, rounds: usize, cpus: (usize, usize), busy: bool) {
    let mut rtt = ping_pong(rounds, cpus, busy);
    rtt.sort();
    let q = |p: usize| rtt[(rtt.len() - 1) * p / 100].as_secs_f64() * 1e6;
    println!("{what:<44} round trip µs: p10 {:>6.1}  p50 {:>6.1}  p90 {:>6.1}", q(10), q(50), q(90));
}

fn ping_pong(rounds: usize, (a, b): (usize, usize), busy: bool) -> Vec<Duration> {
    let (to_b_r, to_b_w) = pipe();
    let (to_a_r, to_a_w) = pipe();
    let answer = std::thread::spawn(move || {
        pin(b);
        let mut byte = [0u8; 1];
        loop {
            wait_readable(to_b_r, if busy { 0 } else { -1 });
            // SAFETY: reading one byte into a live buffer from our own pipe.
            if unsafe { libc::read(to_b_r, byte.as_mut_ptr().cast(), 1) } != 1 {
                continue;
            }
            if byte[0] == 0 {
                break;
            }
            // SAFETY: writing one byte from a live buffer into our own pipe.
            unsafe { libc::write(to_a_w, byte.as_ptr().cast(), 1) };
        }
    });
    pin(a);
    let mut out = Vec::with_capacity(rounds + 10);
    let mut byte = [1u8; 1];
    for _ in 0..rounds + 10 {
        std::thread::sleep(Duration::from_millis(10));
        let t = Instant::now();
        // SAFETY: as above, our own pipes and live buffers.
        unsafe { libc::write(to_b_w, byte.as_ptr().cast(), 1) };
        wait_readable(to_a_r, -1);
        // SAFETY: as above.
        unsafe { libc::read(to_a_r, byte.as_mut_ptr().cast(), 1) };
        out.push(t.elapsed());
    }
    byte[0] = 0;
    // SAFETY: as above.
    unsafe { libc::write(to_b_w, byte.as_ptr().cast(), 1) };
    answer.join().expect("the answering thread");
    for fd in [to_b_r, to_b_w, to_a_r, to_a_w] {
        // SAFETY: closing the pipes this function opened, once.
        unsafe { libc::close(fd) };
    }
    out.split_off(10)
}

/// `poll` on one descriptor: with `timeout` 0, spin until it is readable.
fn wait_readable(fd: i32, timeout: i32) {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd for the duration of the call.
    while unsafe { libc::poll(&mut p, 1, timeout) } < 1 {}
}

fn pipe() -> (i32, i32) {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0, "pipe2");
    (fds[0], fds[1])
}

fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays in bounds for cpu < 1024.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}
