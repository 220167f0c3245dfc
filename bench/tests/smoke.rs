//! A smoke run of every scenario with tiny numbers against a real pushgate (and Nchan when
//! nginx with the Nchan module is installed), so the tool keeps working. Full runs stay out of CI.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;

fn bench() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pushgate-bench"))
}

fn pushgate() -> PathBuf {
    let p = bench().with_file_name("pushgate");
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (cargo build --workspace)",
        p.display()
    );
    p
}

/// A port for a server the bench starts: free when checked, handed out once per test process,
/// and below the kernel's ephemeral range (32768 and up by default), so that none of the many
/// client sockets the scenarios running alongside open can take it before the server binds it.
fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as usize
        + std::process::id() as usize;
    for i in 0.. {
        let port = (20_000 + (seed + i * 7919) % 12_000) as u16;
        if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    unreachable!()
}

fn run(scenario: &str, extra: &[&str]) -> serde_json::Value {
    run_against(
        |server| {
            format!(
                "env PUSHGATE_LOG=warn {} serve --listen {server}",
                pushgate().display()
            )
        },
        scenario,
        extra,
    )
}

/// Runs `scenario` against the server `spawn(address)` starts.
fn run_against(
    spawn: impl Fn(&str) -> String,
    scenario: &str,
    extra: &[&str],
) -> serde_json::Value {
    let port = free_port();
    let server = format!("127.0.0.1:{port}");
    let spawn = spawn(&server);
    let out = Command::new(bench())
        .args(["run", scenario, "--server", &server, "--spawn", &spawn])
        .args(["--load-cpu", "-1", "--timeout", "60", "--duration", "0.3"])
        .args(extra)
        .output()
        .expect("running pushgate-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{scenario} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout.lines().last().expect("a JSON line");
    serde_json::from_str(line).expect("the last line is JSON")
}

#[test]
fn idle() {
    let v = run("idle", &["-n", "50"]);
    assert_eq!(v["connected"], 50);
    assert!(v["server_kib_per_connection"].as_f64().unwrap() > 0.0);
}

#[test]
fn fanout_flat_out_and_at_a_rate() {
    let v = run("fanout", &["-n", "30", "-m", "50", "--rate", "0"]);
    assert_eq!(v["deliveries"], 1500);
    assert_eq!(v["missing"], 0);
    let v = run(
        "fanout",
        &["-n", "20", "-m", "5", "--rate", "50", "--workers", "2"],
    );
    assert_eq!(v["deliveries"], 100);
    assert!(v["latency_p99_us"].as_u64().unwrap() > 0);
    // Latency counts from each message's due time; the report says how late publishing got.
    // It can be no later than the publishing took in all: in milliseconds, within [0, publish_s].
    let behind_ms = v["publish_behind_max_ms"]
        .as_f64()
        .expect("publish_behind_max_ms");
    let publish_s = v["publish_s"].as_f64().expect("publish_s");
    assert!(
        (0.0..=publish_s * 1000.0).contains(&behind_ms),
        "publish_behind_max_ms {behind_ms} outside [0, {} ms]",
        publish_s * 1000.0
    );
}

#[test]
fn longpoll() {
    let v = run("longpoll", &["-n", "10", "-m", "5", "--rate", "50"]);
    assert_eq!(v["deliveries"], 50);
}

#[test]
fn publish() {
    let v = run("publish", &["--publishers", "2"]);
    assert!(v["published"].as_u64().unwrap() > 0);
    assert_eq!(v["publish_failures"], 0);
}

#[test]
fn connect() {
    let v = run("connect", &["-n", "100"]);
    assert_eq!(v["connected"], 100);
    assert_eq!(v["connect_failures"], 0);
}

#[test]
fn many_topics() {
    let v = run("many-topics", &["-n", "40", "--publishers", "2"]);
    assert_eq!(v["deliveries"], 40);
    assert_eq!(v["missing"], 0);
}

#[test]
fn fanout_against_the_floor_server() {
    let v = run_against(
        |server| format!("{} floor --listen {server}", bench().display()),
        "fanout",
        &["--adapter", "nchan", "-n", "20", "-m", "5", "--rate", "50"],
    );
    assert_eq!(v["deliveries"], 100);
    assert_eq!(v["missing"], 0);
    assert!(v["server_cpu_s"].as_f64().unwrap() > 0.0);
}
