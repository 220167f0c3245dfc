//! Ports for the processes a test starts (redis-server, Pebble and its DNS, nginx, pushgate, the
//! bench's peers), and the retry when a port is taken between the pick and the bind.
//!
//! A port is picked free (checked, then released) below the kernel's ephemeral range, so no
//! outgoing connection can take it, and handed out once per test process; but another test
//! process running alongside (another suite, another worktree) can pick and bind the same one
//! before the process it is for does. Then that process fails to bind and exits (or, worse, the
//! test talks to the other process's listener). So a start is judged by the listening sockets
//! of the started process itself (`/proc/net/tcp*` and its `/proc/<pid>/fd`), and a start that
//! lost its port is retried on fresh ones: [`retry_taken_ports`].
//!
//! Standard library only: `tests/support/mod.rs` has it as `support::ports`, and
//! `bench/tests/smoke.rs` includes this file by path.
#![allow(dead_code)] // each test binary uses some of it

use std::process::Child;
use std::time::{Duration, Instant};

/// Starts of one process on fresh ports before a test gives up.
pub const ATTEMPTS: usize = 5;

/// A free TCP port on 127.0.0.1 for a process a test starts, handed out once per test process.
/// Taken below the kernel's ephemeral range (32768 and up by default): a port from that range,
/// released after the check, can be taken by any outgoing connection (of a test running
/// alongside, Pebble's validator, nginx) before the process it is for binds it.
pub fn free_port() -> u16 {
    pick_port(false)
}

/// The same, free on [::1] too.
pub fn free_port_v4_v6() -> u16 {
    pick_port(true)
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.write_u32(std::process::id());
    h.finish()
}

fn pick_port(v6: bool) -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap();
    loop {
        let port = 20_000 + (random_u64() % 12_000) as u16;
        if !given.contains(&port)
            && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && (!v6 || std::net::TcpListener::bind(("::1", port)).is_ok())
        {
            given.push(port);
            take_if_asked(given.len(), port);
            return port;
        }
    }
}

/// Fault injection, to check the retry itself: with `TEST_TAKEN_PORTS=1,3` the 1st and
/// 3rd ports this test process hands out are bound at once (and kept) by the test process, as
/// if another process had taken them between the pick and the bind. The twin in
/// tests/js/support.js reads the same variable.
fn take_if_asked(nth: usize, port: u16) {
    static HELD: std::sync::Mutex<Vec<std::net::TcpListener>> = std::sync::Mutex::new(Vec::new());
    let Ok(list) = std::env::var("TEST_TAKEN_PORTS") else {
        return;
    };
    if list.split(',').any(|n| n.trim().parse() == Ok(nth)) {
        let taken = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        eprintln!("TEST_TAKEN_PORTS: port {port} (the {nth}th handed out) is taken");
        HELD.lock().unwrap().push(taken);
    }
}

/// An attempt at starting a process lost one of its ports to another process (it exited, or
/// the listener on the port is not its own); the text says what was seen.
#[derive(Debug)]
pub struct PortTaken(pub String);

/// Runs `start(attempt)` (attempt 0, 1, ...) until it does not report a taken port, at most
/// [`ATTEMPTS`] times; `start` picks fresh ports on each call (and cleans up after itself when
/// it reports a taken port). Panics, naming `what`, when every attempt lost a port.
pub fn retry_taken_ports<T>(what: &str, mut start: impl FnMut(usize) -> Result<T, PortTaken>) -> T {
    let mut seen = Vec::new();
    for attempt in 0..ATTEMPTS {
        match start(attempt) {
            Ok(v) => return v,
            Err(PortTaken(why)) => {
                eprintln!("{what}: a port was taken, trying fresh ones: {why}");
                seen.push(why);
            }
        }
    }
    panic!("{what} lost a port on each of {ATTEMPTS} attempts: {seen:#?}");
}

/// [`retry_taken_ports`] for a start that awaits.
pub async fn retry_taken_ports_async<T>(
    what: &str,
    mut start: impl AsyncFnMut(usize) -> Result<T, PortTaken>,
) -> T {
    let mut seen = Vec::new();
    for attempt in 0..ATTEMPTS {
        match start(attempt).await {
            Ok(v) => return v,
            Err(PortTaken(why)) => {
                eprintln!("{what}: a port was taken, trying fresh ones: {why}");
                seen.push(why);
            }
        }
    }
    panic!("{what} lost a port on each of {ATTEMPTS} attempts: {seen:#?}");
}

/// `pid` and its descendants (from `/proc/<pid>/stat`'s parent field).
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut parents = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
                continue;
            };
            // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|s| s.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                parents.push((p, ppid));
            }
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    tree
}

/// The inodes of the listening TCP sockets on `port` (any address, IPv4 and IPv6).
fn listening_inodes(port: u16) -> Vec<u64> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != "0A" {
                continue; // not LISTEN
            }
            let local_port = f[1]
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port)
                && let Ok(inode) = f[9].parse::<u64>()
            {
                inodes.push(inode);
            }
        }
    }
    inodes
}

/// Whether one of `pids` holds a listening TCP socket on `port`.
pub fn listens_on(pids: &[u32], port: u16) -> bool {
    let inodes = listening_inodes(port);
    if inodes.is_empty() {
        return false;
    }
    pids.iter().any(|pid| {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            return false;
        };
        fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .ok()
                .and_then(|l| {
                    l.to_str()?
                        .strip_prefix("socket:[")?
                        .strip_suffix(']')?
                        .parse::<u64>()
                        .ok()
                })
                .is_some_and(|i| inodes.contains(&i))
        })
    })
}

/// Where a started process is with its listeners.
#[derive(Debug)]
pub enum Listening {
    /// It (or a descendant) listens on every port.
    Yes,
    /// Not yet on all of them, and still running.
    NotYet,
    /// It exited: a taken port, most likely (its output says).
    Exited(String),
}

/// Whether `child` (or a process it started) listens on every one of `ports`.
pub fn check_listening(child: &mut Child, ports: &[u16]) -> Listening {
    if let Ok(Some(status)) = child.try_wait() {
        return Listening::Exited(format!("exited ({status}) before listening on {ports:?}"));
    }
    let tree = process_tree(child.id());
    if ports.iter().all(|p| listens_on(&tree, *p)) {
        Listening::Yes
    } else {
        Listening::NotYet
    }
}

/// Waits until `child` listens on every one of `ports`. A child that exits first lost a port
/// ([`PortTaken`]); one that neither listens nor exits within `within` fails the test, naming
/// `what`. The caller stops the child on an error.
pub fn wait_listening(
    child: &mut Child,
    ports: &[u16],
    within: Duration,
    what: &str,
) -> Result<(), PortTaken> {
    let end = Instant::now() + within;
    loop {
        match check_listening(child, ports) {
            Listening::Yes => return Ok(()),
            Listening::Exited(why) => return Err(PortTaken(format!("{what} {why}"))),
            Listening::NotYet => {}
        }
        assert!(
            Instant::now() < end,
            "{what} did not listen on {ports:?} within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether a process's output says it could not bind because the address was in use (Rust's
/// and Go's "address already in use", nginx's "(98: Address already in use)", Redis's).
pub fn says_port_taken(log: &str) -> bool {
    log.to_ascii_lowercase().contains("address already in use")
}
