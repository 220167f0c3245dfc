//! A smoke run of every scenario with tiny numbers against a real pushgate, and of the stack
//! as deployed (nginx with the shipped site and TLS, in front of pushgate, Nchan or the floor
//! server), so the tool keeps working. Full runs stay out of CI.

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

/// The stack as deployed (`bench/peers/stack.sh`): nginx with the shipped site, TLS on, in
/// front of pushgate, of Nchan (same server block) or of the floor server (the hop alone).
/// Needs nginx with the brotli and Nchan modules and openssl (scripts/test.sh installs them).
fn run_stack(mode: &str, scenario: &str, extra: &[&str]) -> serde_json::Value {
    let stack = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("peers/stack.sh");
    let tls = std::env::temp_dir().join(format!("pushgate-bench-tls-{}", std::process::id()));
    static CERT: std::sync::Once = std::sync::Once::new();
    CERT.call_once(|| {
        let ok = Command::new(&stack)
            .arg("cert")
            .arg(&tls)
            .status()
            .expect("running stack.sh cert");
        assert!(ok.success(), "stack.sh cert failed");
    });
    let (tls_port, port) = (free_port(), free_port());
    let backend = match mode {
        "pushgate" => pushgate().display().to_string(),
        "hop" => bench().display().to_string(),
        _ => String::new(),
    };
    let spawn = format!(
        "env PUSHGATE_LOG=warn {} {mode} {tls_port} {port} {} {backend}",
        stack.display(),
        tls.display()
    );
    let adapter = if mode == "pushgate" {
        "phoenix"
    } else {
        "nchan"
    };
    let ca = tls.join("ca.pem");
    let out = Command::new(bench())
        .args(["run", scenario, "--adapter", adapter, "--spawn", &spawn])
        .args(["--server", &format!("127.0.0.1:{tls_port}")])
        .args(["--publish-server", &format!("127.0.0.1:{port}")])
        .arg("--tls-ca")
        .arg(&ca)
        .args(["--load-cpu", "-1", "--timeout", "60", "--duration", "0.3"])
        .args(extra)
        .output()
        .expect("running pushgate-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_else(|| {
        panic!(
            "{mode} {scenario}: no result\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    serde_json::from_str(line).expect("the last line is JSON")
}

#[test]
fn the_stack_over_tls_with_each_backend() {
    for mode in ["pushgate", "nchan", "hop"] {
        let v = run_stack(
            mode,
            "fanout",
            &["-n", "20", "-m", "5", "--rate", "50", "--per-address", "10"],
        );
        assert_eq!(v["tls"], true, "{mode}: {v}");
        assert_eq!(v["ok"], true, "{mode}: {v}");
        assert_eq!(v["deliveries"], 100, "{mode}: {v}");
        // nginx's worker and the backend both count.
        assert!(v["server_cpu_s"].as_f64().unwrap() > 0.0, "{mode}: {v}");
    }
    for mode in ["pushgate", "nchan"] {
        let v = run_stack(
            mode,
            "longpoll",
            &["-n", "10", "-m", "5", "--rate", "50", "--per-address", "5"],
        );
        assert_eq!(v["ok"], true, "{mode}: {v}");
        assert_eq!(v["deliveries"], 50, "{mode}: {v}");
    }
}

/// The site's own per-address limits are in force in the stack (it is the shipped site, not
/// a bench variant): 200 WebSocket upgrades at once from one address exceed its burst of 150,
/// and the same spread over addresses pass.
#[test]
fn the_stack_keeps_the_sites_per_address_limits() {
    let one = run_stack("pushgate", "connect", &["-n", "200"]);
    assert!(one["connect_failures"].as_u64().unwrap() > 0, "{one}");
    let spread = run_stack(
        "pushgate",
        "connect",
        &["-n", "200", "--per-address", "100"],
    );
    assert_eq!(spread["connect_failures"], 0, "{spread}");
    assert_eq!(spread["connected"], 200, "{spread}");
}
