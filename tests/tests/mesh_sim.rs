//! The whole control plane in the simulator (`meshnet_tests::sim::mesh`): many
//! routers, each told only about router 0 as `meshnet launch` would be, with
//! discovery, `--conn-limit`, topology gossip and IPAM, over simulated
//! connections with latency, lost dials, partitions and churn.
//!
//! - `sixty_routers_converge_heal_and_churn` (CI; `MESH_SIM_CI_PEERS=n` for
//!   another count: 200 take ~10 minutes, most of it verifying signatures):
//!   converges within a bound, every router allocates 3 addresses,
//!   steady-state gossip stays under a bound per router per minute, a
//!   partition heals, routers leave and join.
//! - `scale_1000_routers` (opt-in, `--ignored`; `MESH_SIM_PEERS=n` for another
//!   count): the figures BENCHMARKS.md records.
//! - `steady_state_gossip_grows_sublinearly` (opt-in, `--ignored`;
//!   `MESH_SIM_SIZES=100,300,1000`): topology bytes per router per minute at rest.
//!
//! `cargo test --release -p meshnet-tests --test mesh_sim -- --include-ignored --nocapture`

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use meshnet_proto::ipam::{Allocation, Cidr, Request};
use meshnet_tests::sim::mesh::{MeshConfig, MeshSim, Traffic};

/// Counts heap bytes in use and their peak.
struct Counting;

static IN_USE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = IN_USE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        IN_USE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size > layout.size() {
                let now = IN_USE.fetch_add(new_size - layout.size(), Ordering::Relaxed) + new_size - layout.size();
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                IN_USE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const MINUTE: u64 = 60_000;

fn universe() -> Cidr {
    "10.32.0.0/12".parse().unwrap()
}

fn config(seed: u64, ipam: bool) -> MeshConfig {
    MeshConfig { conn_limit: 10, latency_ms: (5, 50), dial_loss: 0.01, ipam: ipam.then(universe), seed }
}

/// Every router launched at once, told only about router 0.
fn launch(n: usize, cfg: MeshConfig) -> MeshSim {
    let mut sim = MeshSim::new(n, cfg);
    sim.start(0, None);
    for i in 1..n {
        sim.start(i, Some(0));
    }
    sim
}

fn per_peer(t: &Traffic, peers: usize, minutes: f64) -> String {
    let k = |b: u64| b as f64 / peers as f64 / minutes / 1000.0;
    format!(
        "{:.1} KB/router/min topology ({:.2} of it digests and summaries), {:.1} KB IPAM, {:.2} KB other; {:.0} messages/router/min",
        k(t.topology_bytes),
        k(t.anti_entropy_bytes),
        k(t.ipam_bytes),
        k(t.other_bytes),
        (t.topology_msgs + t.ipam_msgs + t.other_msgs) as f64 / peers as f64 / minutes
    )
}

/// IPAM agreement (started by one allocation), then 3 addresses per router.
/// Returns (ms to agree, ms until every allocation is done).
fn allocate_three_each(sim: &mut MeshSim, limit_ms: u64) -> (u64, u64) {
    let any = Request::Any(universe());
    let start = sim.now;
    let _ = sim.ipam_mut(0).allocate("p0-0", any.clone(), start);
    sim.after_ipam_call(0);
    while !sim.ipam_agreed() {
        sim.run_for(1_000);
        assert!(sim.now - start < limit_ms, "no IPAM agreement after {} s", limit_ms / 1000);
    }
    let agreed = sim.now - start;
    for k in 0..3 {
        for i in sim.up() {
            if i == 0 && k == 0 {
                continue;
            }
            let now = sim.now;
            let r = sim.ipam_mut(i).allocate(&format!("p{i}-{k}"), any.clone(), now);
            assert!(matches!(r, Ok(Allocation::Ready { .. } | Allocation::Pending(_))), "router {i}: {r:?}");
            sim.after_ipam_call(i);
        }
    }
    loop {
        sim.run_for(1_000);
        if sim.up().iter().all(|&i| sim.ipam_mut(i).pending_count() == 0) {
            break;
        }
        assert!(sim.now - start < limit_ms, "allocations pending after {} s", limit_ms / 1000);
    }
    let held: usize = sim.up().iter().map(|&i| sim.ipam_mut(i).allocations().count()).sum();
    assert_eq!(held, 3 * sim.up().len(), "every router holds 3 addresses");
    (agreed, sim.now - start)
}

/// After a minute more (a router that took lonely newcomers over its limit
/// sheds redundant connections one by one): one mesh, every router within
/// its limit and connected.
fn check_shape(sim: &mut MeshSim, limit: usize, what: &str) {
    sim.run_for(MINUTE);
    assert!(sim.converged(), "{what}: still converged a minute later");
    let degrees = sim.degrees();
    assert!(sim.connected_graph(), "{what}: the connections do not form one mesh");
    assert!(degrees.iter().all(|&d| (1..=limit).contains(&d)), "{what}: connections per router {degrees:?}");
}

#[test]
fn sixty_routers_converge_heal_and_churn() {
    let n: usize = std::env::var("MESH_SIM_CI_PEERS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let wall = Instant::now();
    let mut sim = launch(n, config(7, true));
    let converged = sim.run_until_converged(5 * MINUTE).expect("every router knows and reaches every other within 5 minutes");
    check_shape(&mut sim, 10, "after launch");
    let c0 = sim.counters.clone();
    println!("{n} routers: converged after {} s virtual; {:?}; wall {:.1?}", converged / 1000, c0, wall.elapsed());
    assert!(converged <= 3 * MINUTE, "converged only after {} s", converged / 1000);

    let (agreed, allocated) = allocate_three_each(&mut sim, 5 * MINUTE);
    println!("IPAM: agreed after {} s, 3 addresses each after {} s", agreed / 1000, allocated / 1000);

    // Steady state: 5 minutes at rest.
    sim.run_for(MINUTE);
    let before = sim.traffic.clone();
    let c_before = sim.counters.clone();
    sim.run_for(5 * MINUTE);
    let rest = sim.traffic.since(&before);
    println!("at rest: {}; counters then {:?}, after {:?}", per_peer(&rest, n, 5.0), c_before, sim.counters);
    assert!(sim.converged(), "still converged at rest");
    let topo_per_min = rest.topology_bytes / n as u64 / 5;
    assert!(topo_per_min < 2_000, "topology gossip at rest: {topo_per_min} B/router/min");

    // A partition in two halves for 2 minutes, then healed.
    let halves: Vec<u32> = (0..n).map(|i| (i % 2) as u32).collect();
    sim.set_partitions(&halves);
    sim.run_for(2 * MINUTE);
    assert!(!sim.converged(), "a partition splits the mesh");
    sim.heal();
    let healed = sim.run_until_converged(5 * MINUTE).expect("the partition heals within 5 minutes");
    check_shape(&mut sim, 10, "after the partition");
    println!("partition healed: converged {} s after the heal", healed / 1000);

    // Churn: a tenth leave, as many new ones join (told about router 0).
    let leaving: Vec<usize> = (1..n).step_by(10).collect();
    for &i in &leaving {
        sim.crash(i);
    }
    for _ in &leaving {
        let j = sim.add_node();
        sim.start(j, Some(0));
    }
    let churned = sim.run_until_converged(5 * MINUTE).expect("converged again after churn within 5 minutes");
    check_shape(&mut sim, 10, "after churn");
    println!("churn ({} left, {} joined): converged after {} s; {:?}; wall {:.1?}", leaving.len(), leaving.len(), churned / 1000, sim.counters, wall.elapsed());
    assert!(healed <= 3 * MINUTE && churned <= 3 * MINUTE, "healed {} s, churn {} s", healed / 1000, churned / 1000);
}

/// Topology bytes per router per minute at rest, after converging, for `n`.
fn steady_state(n: usize, seed: u64) -> (u64, Traffic, u64) {
    let mut sim = launch(n, config(seed, false));
    let converged = sim.run_until_converged(20 * MINUTE).expect("converged");
    sim.run_for(MINUTE);
    let before = sim.traffic.clone();
    sim.run_for(5 * MINUTE);
    assert!(sim.converged());
    (converged, sim.traffic.since(&before), sim.topology_bytes() / n as u64)
}

#[test]
#[ignore = "opt-in: MESH_SIM_SIZES (default 100,300,1000) takes minutes"]
fn steady_state_gossip_grows_sublinearly() {
    let sizes: Vec<usize> = std::env::var("MESH_SIM_SIZES")
        .unwrap_or_else(|_| "100,300,1000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let mut figures = Vec::new();
    for &n in &sizes {
        let wall = Instant::now();
        let (converged, rest, topo) = steady_state(n, 11);
        let per_min = rest.topology_bytes as f64 / n as f64 / 5.0;
        println!(
            "{n} routers (--conn-limit 10): converged after {} s; at rest {} ; topology held {} KB per router; wall {:.1?}",
            converged / 1000,
            per_peer(&rest, n, 5.0),
            topo / 1000,
            wall.elapsed()
        );
        figures.push((n, per_min));
    }
    for w in figures.windows(2) {
        let ((n1, b1), (n2, b2)) = (w[0], w[1]);
        let growth = b2 / b1.max(1.0);
        let size = n2 as f64 / n1 as f64;
        assert!(growth < size, "{n1} -> {n2} routers: bytes/router/min grew {growth:.2}x, the mesh {size:.2}x");
    }
}

#[test]
#[ignore = "opt-in: 1000 routers take minutes (MESH_SIM_PEERS=n for another count)"]
fn scale_1000_routers() {
    let n: usize = std::env::var("MESH_SIM_PEERS").ok().and_then(|s| s.parse().ok()).unwrap_or(1000);
    let wall = Instant::now();
    let heap0 = IN_USE.load(Ordering::Relaxed);
    PEAK.store(heap0, Ordering::Relaxed);
    let mut sim = launch(n, config(42, true));
    let converged = sim.run_until_converged(20 * MINUTE).expect("converged within 20 virtual minutes");
    let t_conv = sim.traffic.clone();
    check_shape(&mut sim, 10, "after launch");
    println!(
        "{n} routers, --conn-limit 10: converged after {} s virtual (wall {:.1?}); {:?}",
        converged / 1000,
        wall.elapsed(),
        sim.counters
    );
    println!(
        "  until converged: {} messages, {} MB topology ({} KB/router), {} KB other",
        t_conv.topology_msgs + t_conv.other_msgs,
        t_conv.topology_bytes >> 20,
        t_conv.topology_bytes / n as u64 / 1000,
        t_conv.other_bytes >> 10
    );
    let (agreed, allocated) = allocate_three_each(&mut sim, 20 * MINUTE);
    let t_ipam = sim.traffic.since(&t_conv);
    println!(
        "  IPAM: agreed after {} s, 3 addresses each after {} s: {} messages, {} KB/router IPAM, {} KB/router topology meanwhile (wall {:.1?})",
        agreed / 1000,
        allocated / 1000,
        t_ipam.ipam_msgs,
        t_ipam.ipam_bytes / n as u64 / 1000,
        t_ipam.topology_bytes / n as u64 / 1000,
        wall.elapsed()
    );
    sim.run_for(MINUTE);
    let before = sim.traffic.clone();
    sim.run_for(5 * MINUTE);
    let rest = sim.traffic.since(&before);
    assert!(sim.converged());
    println!("  at rest: {}", per_peer(&rest, n, 5.0));
    let degrees = sim.degrees();
    let in_use = IN_USE.load(Ordering::Relaxed).saturating_sub(heap0);
    println!(
        "  connections per router: min {} max {} mean {:.1}; topology held per router {} KB; heap in use {} MB ({} KB per router), peak {} MB; wall {:.1?}",
        degrees.iter().min().unwrap(),
        degrees.iter().max().unwrap(),
        degrees.iter().sum::<usize>() as f64 / n as f64,
        sim.topology_bytes() / n as u64 / 1000,
        in_use >> 20,
        in_use / n / 1000,
        (PEAK.load(Ordering::Relaxed) - heap0) >> 20,
        wall.elapsed()
    );
}
