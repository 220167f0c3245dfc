//! The real binary: `check-config`, `serve` with its flags and environment, logs, and shutdown
//! on SIGTERM. Environment variables are set on the child only, never on the test process; every
//! `PUSHGATE_*` variable of the test process (and `PORT`) is removed from the child's environment.

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use support::*;

/// How long the binary may take to start listening.
const STARTUP: Duration = Duration::from_secs(10);

/// `pushgate` with a clean `PUSHGATE_*` environment.
fn pushgate() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pushgate"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("PUSHGATE_") || k == "PORT" {
            c.env_remove(k);
        }
    }
    c.stdin(Stdio::null());
    c
}

/// Runs a short command (check-config) to completion, with a deadline.
fn run(mut cmd: Command) -> Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn pushgate");
    let end = Instant::now() + STARTUP;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > end {
            let _ = child.kill();
            panic!("pushgate did not exit in time");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A file under the temp dir with a unique name, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, contents: &str) -> TempFile {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "pushgate-cli-{}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            name
        ));
        std::fs::write(&path, contents).unwrap();
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A running `pushgate serve`, its stderr lines, and the address it logged. Killed on drop.
struct Served {
    child: Child,
    lines: mpsc::Receiver<String>,
    log: Vec<String>,
    addr: SocketAddr,
}

impl Served {
    fn spawn(mut cmd: Command) -> Served {
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn pushgate serve");
        let stderr = child.stderr.take().unwrap();
        Served::reading(child, stderr)
    }

    /// `pushgate` with `args` and `env`, its stderr a terminal: run under util-linux `script`,
    /// which gives it a pseudo-terminal and copies what it writes there to `script`'s stdout.
    /// Log lines are returned without their ANSI colours.
    fn spawn_on_terminal(args: &str, env: &[(&str, &str)]) -> Served {
        let mut cmd = Command::new("script");
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("PUSHGATE_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(env.iter().copied());
        cmd.args(["-q", "-f", "-e", "-c"])
            .arg(format!("exec {} {args}", env!("CARGO_BIN_EXE_pushgate")))
            .arg("/dev/null")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd
            .spawn()
            .expect("util-linux `script` is needed to give pushgate a terminal");
        let stdout = child.stdout.take().unwrap();
        Served::reading(child, stdout)
    }

    fn reading(child: Child, out: impl std::io::Read + Send + 'static) -> Served {
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(strip_ansi(line.trim_end_matches('\r'))).is_err() {
                    break;
                }
            }
        });
        let mut s = Served {
            child,
            lines,
            log: Vec::new(),
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        let line = s.wait_line(|l| l.contains("listening") && l.contains("addr="));
        s.addr = field(&line, "addr")
            .parse()
            .unwrap_or_else(|e| panic!("bad addr in {line:?}: {e}"));
        assert_ne!(s.addr.port(), 0);
        s
    }

    /// The first log line (already seen or still to come) that satisfies `pred`.
    fn wait_line(&mut self, pred: impl Fn(&str) -> bool) -> String {
        if let Some(l) = self.log.iter().find(|l| pred(l)) {
            return l.clone();
        }
        let end = Instant::now() + STARTUP;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(e) => {
                    let status = self.child.try_wait().ok().flatten();
                    panic!(
                        "log line not found ({e}); exit status {status:?}; log:\n{}",
                        self.log.join("\n")
                    );
                }
            }
        }
    }

    /// Everything logged so far.
    fn drain_log(&mut self) -> String {
        while let Ok(line) = self.lines.try_recv() {
            self.log.push(line);
        }
        self.log.join("\n")
    }

    fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `line` without ANSI escape sequences (`ESC [ ... letter`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The value of `name=value` in a plain log line.
fn field(line: &str, name: &str) -> String {
    let key = format!("{name}=");
    let at = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&key))
        .unwrap_or_else(|| panic!("no {name}= in {line:?}"));
    at.trim_matches('"').to_string()
}

// ---------------------------------------------------------------------------------------------
// check-config
// ---------------------------------------------------------------------------------------------

#[test]
fn check_config_without_a_file_prints_the_defaults_as_toml() {
    let mut cmd = pushgate();
    cmd.arg("check-config");
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains(r#"listen = "127.0.0.1:4000""#), "{stdout}");
    let parsed: toml::Table = stdout.parse().expect("the output is TOML");
    assert_eq!(parsed["server"]["listen"].as_str(), Some("127.0.0.1:4000"));

    // The output is itself a valid configuration that yields the same output.
    let file = TempFile::new("roundtrip.toml", &stdout);
    let mut cmd = pushgate();
    cmd.arg("check-config").arg("--config").arg(&file.0);
    let again = run(cmd);
    assert_eq!(again.status.code(), Some(0), "{}", text(&again.stderr));
    assert_eq!(text(&again.stdout), stdout);
}

#[test]
fn check_config_shows_the_file_and_environment_overlay() {
    let file = TempFile::new("ok.toml", "[history]\nsize = 7\nmax_age_secs = 9\n");
    let mut cmd = pushgate();
    cmd.arg("check-config")
        .arg("--config")
        .arg(&file.0)
        .env("PUSHGATE_HISTORY_MAX_AGE_SECS", "60")
        .env("PUSHGATE_LISTEN", "127.0.0.1:4100")
        .env("PUSHGATE_AUTH_SECRET", "a-connect-token-secret-of-32-bytes")
        .env("PUSHGATE_AUTH_PRIVATE_TOPICS", "user:*");
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // Secrets are never printed.
    assert!(!text(&out.stdout).contains("a-connect-token-secret"));
    let parsed: toml::Table = text(&out.stdout).parse().unwrap();
    assert_eq!(parsed["auth"]["secret"].as_str(), Some("(set, hidden)"));
    assert_eq!(parsed["auth"]["private_topics"][0].as_str(), Some("user:*"));
    assert_eq!(parsed["history"]["size"].as_integer(), Some(7));
    assert_eq!(parsed["history"]["max_age_secs"].as_integer(), Some(60));
    assert_eq!(parsed["server"]["listen"].as_str(), Some("127.0.0.1:4100"));
}

#[test]
fn check_config_names_every_bad_key_and_exits_64() {
    let file = TempFile::new(
        "bad.toml",
        "[history]\nsize = 0\n[server]\nlisten = \"nope\"\n",
    );
    let mut cmd = pushgate();
    cmd.arg("check-config").arg("--config").arg(&file.0);
    let out = run(cmd);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("history.size"), "{stderr}");
    assert!(stderr.contains("server.listen"), "{stderr}");
    assert!(out.stdout.is_empty(), "no config printed on error");
}

#[test]
fn check_config_refuses_unknown_keys_sections_and_bad_files() {
    for (name, contents, named) in [
        ("unknown-key.toml", "[server]\nlistenn = \"x\"\n", "listenn"),
        (
            "unknown-section.toml",
            "[serverr]\nlisten = \"x\"\n",
            "serverr",
        ),
        ("not-toml.toml", "[server\nlisten = ", ""),
    ] {
        let file = TempFile::new(name, contents);
        let mut cmd = pushgate();
        cmd.arg("check-config").arg("--config").arg(&file.0);
        let out = run(cmd);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{name}: {stderr}");
        assert!(stderr.contains(named), "{name}: {stderr}");
    }
    let missing = std::env::temp_dir().join(format!("pushgate-cli-missing-{}", std::process::id()));
    let mut cmd = pushgate();
    cmd.arg("check-config").arg("--config").arg(&missing);
    let out = run(cmd);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains(&*missing.to_string_lossy()),
        "the path is named: {stderr}"
    );
}

/// The packaged unit passes `--config /etc/pushgate/pushgate.toml --config-optional`: a deleted
/// file means the defaults, a file that exists is read (and a bad one still refused).
#[test]
fn config_optional_means_defaults_only_when_the_file_does_not_exist() {
    let missing =
        std::env::temp_dir().join(format!("pushgate-cli-optional-{}", std::process::id()));
    let mut cmd = pushgate();
    cmd.arg("check-config")
        .arg("--config")
        .arg(&missing)
        .arg("--config-optional");
    let out = run(cmd);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("size = 1000"),
        "{}",
        text(&out.stdout)
    );

    let file = TempFile::new("optional-present.toml", "[history]\nsize = 7\n");
    let mut cmd = pushgate();
    cmd.arg("check-config")
        .arg("--config")
        .arg(&file.0)
        .arg("--config-optional");
    let out = run(cmd);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("size = 7"),
        "{}",
        text(&out.stdout)
    );

    let bad = TempFile::new("optional-bad.toml", "[history]\nsize = \"many\"\n");
    let mut cmd = pushgate();
    cmd.arg("check-config")
        .arg("--config")
        .arg(&bad.0)
        .arg("--config-optional");
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out.stderr));
}

#[test]
fn check_config_refuses_unknown_environment_variables() {
    for (var, named) in [
        ("PUSHGATE_HISTORY_SIZEE", "sizee"),
        ("PUSHGATE_NOPE", "pushgate_nope"),
    ] {
        let mut cmd = pushgate();
        cmd.arg("check-config").env(var, "1");
        let out = run(cmd);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{var}: {stderr}");
        assert!(stderr.to_lowercase().contains(named), "{var}: {stderr}");
    }
    // The two variables for logging are not config keys and are accepted.
    let mut cmd = pushgate();
    cmd.arg("check-config")
        .env("PUSHGATE_LOG", "debug")
        .env("PUSHGATE_LOG_FORMAT", "json");
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn check_config_names_the_key_of_a_wrongly_typed_value() {
    // DESIGN.md §2: check-config prints "each problem with its key". Today the message is
    // `config error: config: invalid type: string "abc", expected usize`.
    let mut cmd = pushgate();
    cmd.arg("check-config").env("PUSHGATE_HISTORY_SIZE", "abc");
    let out = run(cmd);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("history.size") || stderr.contains("PUSHGATE_HISTORY_SIZE"),
        "{stderr}"
    );
    let file = TempFile::new("typed.toml", "[history]\nsize = \"abc\"\n");
    let mut cmd = pushgate();
    cmd.arg("check-config").arg("--config").arg(&file.0);
    let out = run(cmd);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("history.size"), "{stderr}");
}

#[test]
fn check_config_hides_the_redis_password() {
    let mut cmd = pushgate();
    cmd.arg("check-config").env(
        "PUSHGATE_REDIS_URL",
        "redis://:s3cret-pass@127.0.0.1:6379/0",
    );
    let out = run(cmd);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(!stdout.contains("s3cret"), "{stdout}");
    assert!(
        stdout.contains(r#"url = "redis://:hidden@127.0.0.1:6379/0""#),
        "{stdout}"
    );
}

#[test]
fn check_config_refuses_plain_http_forwarding_to_a_remote_host_unless_opted_in() {
    let check = |url: &str, opt_in: Option<&str>| {
        let mut cmd = pushgate();
        cmd.arg("check-config")
            .env("PUSHGATE_FORWARD_URL", url)
            .env("PUSHGATE_FORWARD_TOPICS", "chat:*");
        if let Some(v) = opt_in {
            cmd.env("PUSHGATE_FORWARD_ALLOW_INSECURE_HTTP", v);
        }
        let out = run(cmd);
        (out.status.code(), text(&out.stderr))
    };
    for remote in [
        "http://app.internal:3000/push",
        "http://10.0.0.5/push",
        "http://[2001:db8::1]/push",
    ] {
        let (code, stderr) = check(remote, None);
        assert_eq!(code, Some(64), "{remote}: {stderr}");
        assert!(
            stderr.contains("forward.url") && stderr.contains("forward.allow_insecure_http"),
            "{remote}: {stderr}"
        );
        let (code, stderr) = check(remote, Some("true"));
        assert_eq!(code, Some(0), "{remote} with the opt-in: {stderr}");
    }
    for fine in [
        "http://127.0.0.1:3000/push",
        "http://[::1]:3000/push",
        "http://localhost:3000/push",
        "https://app.example.com/push",
    ] {
        let (code, stderr) = check(fine, None);
        assert_eq!(code, Some(0), "{fine}: {stderr}");
    }
}

// ---------------------------------------------------------------------------------------------
// serve
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_failed_forward_is_logged_with_its_detail_and_the_client_gets_a_generic_reply() {
    let mut cmd = pushgate();
    cmd.args(["serve", "--listen", "127.0.0.1:0"])
        .env("PUSHGATE_PUBLISH_TOKEN", TOKEN)
        .env(
            "PUSHGATE_FORWARD_URL",
            format!("http://127.0.0.1:{}/push", free_port()),
        )
        .env("PUSHGATE_FORWARD_TOPICS", "room:*");
    let mut p = Served::spawn(cmd);
    let mut ws = connect(p.addr).await;
    join(&mut ws, "1", "room:f", "{}").await;
    send(&mut ws, r#"["1","2","room:f","hello",{}]"#).await;
    let reply = recv(&mut ws).await;
    assert_eq!(
        reply[4],
        serde_json::json!({"status": "error", "response": {"reason": "forward failed"}}),
        "{reply}"
    );
    let line = p.wait_line(|l| l.contains("forward"));
    assert!(
        line.contains("cannot reach the app") && line.contains("WARN"),
        "{line}"
    );
}

#[tokio::test]
async fn serve_with_a_configured_token_publishes_with_it_and_never_logs_it() {
    let mut cmd = pushgate();
    cmd.args(["serve", "--listen", "127.0.0.1:0"])
        .env("PUSHGATE_PUBLISH_TOKEN", TOKEN);
    let mut p = Served::spawn(cmd);
    let addr = p.addr;
    assert!(addr.ip().is_loopback());

    let mut ws = connect(addr).await;
    join(&mut ws, "1", "room:cli", "{}").await;
    let pos = publish(addr, "room:cli", "e", r#"{"via":"binary"}"#).await;
    let m = recv(&mut ws).await;
    assert_eq!(m[1], pos.as_str());
    assert_eq!(m[4]["via"], "binary");

    let (status, _, _) = post_publish(
        addr,
        Some("Bearer wrong-token-0123456789"),
        br#"{"topic":"room:cli","event":"e","payload":1}"#,
    )
    .await;
    assert_eq!(status, 401);

    let log = p.drain_log();
    assert!(
        !log.contains(TOKEN),
        "the configured token was logged:\n{log}"
    );
    assert!(
        !log.contains('\x1b'),
        "ANSI escapes in a non-tty log:\n{log}"
    );
    assert!(!log.contains("curl"), "no generated-token hint:\n{log}");
}

/// Whether `log` holds a run of 32 hex digits: the shape of a generated publish token.
fn has_token_shape(log: &str) -> bool {
    log.as_bytes()
        .windows(32)
        .any(|w| w.iter().all(|b| b.is_ascii_hexdigit()))
}

#[tokio::test]
async fn serve_without_a_token_does_not_log_the_generated_one_when_stderr_is_not_a_terminal() {
    let mut cmd = pushgate();
    cmd.args(["serve", "--listen", "127.0.0.1:0"]);
    let mut p = Served::spawn(cmd);
    let warning = p.wait_line(|l| l.contains("PUSHGATE_PUBLISH_TOKEN"));
    assert!(warning.contains("WARN"), "{warning}");
    assert!(warning.contains("not a terminal"), "{warning}");
    // A request after start-up, so that everything start-up logs is in.
    let (status, _, _) = http(p.addr, "GET", "/healthz", &[], b"").await;
    assert_eq!(status, 200);
    let log = p.drain_log();
    assert!(
        !has_token_shape(&log),
        "a token-shaped string in the log:\n{log}"
    );
    assert!(!log.contains("Bearer") && !log.contains("curl"), "{log}");
}

#[tokio::test]
async fn serve_without_a_token_on_a_terminal_shows_a_generated_one_and_a_curl_line_that_works() {
    let mut p = Served::spawn_on_terminal("serve --listen 127.0.0.1:0", &[]);
    let addr = p.addr;
    let token_line = p.wait_line(|l| l.contains("token="));
    let token = field(&token_line, "token");
    assert!(token.len() >= 16, "{token_line}");
    assert!(token.chars().all(|c| c.is_ascii_alphanumeric()), "{token}");
    let curl_line = p.wait_line(|l| l.contains("curl "));
    let curl = &curl_line[curl_line.find("curl ").unwrap()..];
    assert!(curl.contains(&format!("Bearer {token}")), "{curl}");
    assert!(
        curl.contains(&format!("http://{addr}/api/publish")),
        "{curl}"
    );

    let mut ws = connect(addr).await;
    let resp = join(&mut ws, "1", "room:lobby", "{}").await;
    let (_, offset) = split_position(resp["position"].as_str().unwrap());

    // The token works with our client...
    let auth = format!("Bearer {token}");
    let (status, _, v) = post_publish(
        addr,
        Some(&auth),
        br#"{"topic":"room:lobby","event":"new_msg","payload":{"body":"ours"}}"#,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        split_position(v["position"].as_str().unwrap()).1,
        offset + 1
    );
    assert_eq!(recv(&mut ws).await[4]["body"], "ours");

    // ...and the logged line, pasted into a shell, publishes (when curl is installed).
    let has_curl = Command::new("curl")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if has_curl {
        let mut sh = Command::new("sh");
        sh.arg("-c").arg(format!("{curl} -sS --max-time 5"));
        let out = run(sh);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            split_position(v["position"].as_str().unwrap()).1,
            offset + 2
        );
        let m = recv(&mut ws).await;
        assert_eq!(
            (m[3].as_str(), m[1].clone()),
            (Some("new_msg"), v["position"].clone())
        );
    } else {
        eprintln!("curl is not installed: the pasted line was not run");
    }
}

#[tokio::test]
async fn client_strings_are_logged_escaped_so_a_newline_cannot_forge_a_log_line() {
    let mut cmd = pushgate();
    cmd.args(["serve", "--listen", "127.0.0.1:0"])
        .env("PUSHGATE_PUBLISH_TOKEN", TOKEN)
        .env("PUSHGATE_LOG", "debug")
        .env("PUSHGATE_AUTH_SECRET", "0123456789abcdef0123456789abcdef")
        .env("PUSHGATE_AUTH_PRIVATE_TOPICS", "secret:*");
    let mut p = Served::spawn(cmd);
    let forged = "2026-01-01T00:00:00.000000Z  INFO pushgate: forged";
    let mut ws = connect(p.addr).await;
    // A refused join of a private topic is logged (debug) with its topic.
    let topic = format!("secret:a\n{forged}");
    send(
        &mut ws,
        &serde_json::json!(["1", "1", topic, "phx_join", {}]).to_string(),
    )
    .await;
    let reply = recv(&mut ws).await;
    assert_eq!(reply[4]["status"], "error", "{reply}");
    // A second one, logged after the first: once it is in, so is everything before.
    let reply = join_reply(&mut ws, "2", "secret:sentinel", "{}").await;
    assert_eq!(reply["status"], "error", "{reply}");
    p.wait_line(|l| l.contains("secret:sentinel"));
    let log = p.drain_log();
    assert!(
        !log.lines().any(|l| l.starts_with("2026-01-01T00:00:00")),
        "a client's newline started a log line of its own:\n{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("join refused") && l.contains(r"secret:a\n2026-01-01")),
        "the topic, escaped, in the refusal's line:\n{log}"
    );
}

#[tokio::test]
async fn pushgate_listen_sets_the_address_and_the_flag_overrides_it() {
    let mut cmd = pushgate();
    cmd.arg("serve")
        .env("PUSHGATE_LISTEN", "127.0.0.1:0")
        .env("PUSHGATE_PUBLISH_TOKEN", TOKEN);
    let p = Served::spawn(cmd);
    assert_ne!(p.addr.port(), 4000);
    let (status, _, _) = http(p.addr, "GET", "/healthz", &[], b"").await;
    assert_eq!(status, 200);
    drop(p);

    // A port we hold: if the flag did not override the variable, binding it would fail.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let held_addr = held.local_addr().unwrap();
    let mut cmd = pushgate();
    cmd.args(["serve", "--listen", "127.0.0.1:0"])
        .env("PUSHGATE_LISTEN", held_addr.to_string())
        .env("PUSHGATE_PUBLISH_TOKEN", TOKEN);
    let p = Served::spawn(cmd);
    assert_ne!(p.addr, held_addr);
    let (status, _, _) = http(p.addr, "GET", "/readyz", &[], b"").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn the_listen_flag_overrides_an_invalid_pushgate_listen() {
    // main.rs validates the file+environment config in `load()` and only then applies
    // `--listen`, so `PUSHGATE_LISTEN=nope pushgate serve --listen 127.0.0.1:0` exits 64 with
    // "server.listen: must be an IP address and port", although the flag's help says it
    // overrides server.listen and PUSHGATE_LISTEN.
    let mut cmd = pushgate();
    cmd.args(["serve", "--listen", "127.0.0.1:0"])
        .env("PUSHGATE_LISTEN", "nope")
        .env("PUSHGATE_PUBLISH_TOKEN", TOKEN);
    let p = Served::spawn(cmd);
    let (status, _, _) = http(p.addr, "GET", "/healthz", &[], b"").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn serve_with_a_bad_config_exits_64_before_listening() {
    let mut cmd = pushgate();
    cmd.args(["serve", "--listen", "127.0.0.1:0"])
        .env("PUSHGATE_HISTORY_SIZE", "0");
    let out = run(cmd);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("history.size"), "{stderr}");
    assert!(!stderr.contains("listening"), "{stderr}");

    let mut cmd = pushgate();
    cmd.args(["serve", "--listen", "not-an-address"]);
    let out = run(cmd);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("server.listen"), "{stderr}");

    // Edge mode needs the domains to ask certificates for.
    let mut cmd = pushgate();
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--tls", "127.0.0.1:0"]);
    let out = run(cmd);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("acme.domains"), "{stderr}");
}

#[tokio::test]
async fn json_logs_carry_the_listening_address_as_a_field() {
    let mut cmd = pushgate();
    cmd.args(["serve", "--listen", "127.0.0.1:0"])
        .env("PUSHGATE_PUBLISH_TOKEN", TOKEN)
        .env("PUSHGATE_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let end = Instant::now() + STARTUP;
    let addr: SocketAddr = loop {
        let line = rx
            .recv_timeout(end.saturating_duration_since(Instant::now()))
            .expect("no listening line");
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if v["fields"]["message"] == "listening" {
            break v["fields"]["addr"].as_str().unwrap().parse().unwrap();
        }
    };
    let (status, _, _) = http(addr, "GET", "/healthz", &[], b"").await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status, 200);
}

/// Reads `pipe` line by line on a thread of its own.
fn lines_of(pipe: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

#[tokio::test]
async fn port_listens_on_every_interface_and_the_image_logs_json_to_stdout() {
    // What a container platform and the image's defaults give the binary: PORT (0 here: the
    // kernel picks a free one, which the log names), JSON logs on stdout.
    let mut cmd = pushgate();
    cmd.arg("serve")
        .env("PORT", "0")
        .env("PUSHGATE_PUBLISH_TOKEN", TOKEN)
        .env("PUSHGATE_LOG_FORMAT", "json")
        .env("PUSHGATE_LOG_OUTPUT", "stdout")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let stdout = lines_of(child.stdout.take().unwrap());
    let stderr = lines_of(child.stderr.take().unwrap());
    let end = Instant::now() + STARTUP;
    let addr: SocketAddr = loop {
        let Ok(line) = stdout.recv_timeout(end.saturating_duration_since(Instant::now())) else {
            let _ = child.kill();
            let errs: Vec<String> = stderr.try_iter().collect();
            panic!("no listening line on stdout; stderr:\n{}", errs.join("\n"));
        };
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if v["fields"]["message"] == "listening" {
            break v["fields"]["addr"].as_str().unwrap().parse().unwrap();
        }
    };
    assert!(
        addr.ip().is_unspecified(),
        "listening on {addr}, not 0.0.0.0"
    );
    assert_ne!(addr.port(), 0);
    let loopback = SocketAddr::from(([127, 0, 0, 1], addr.port()));
    let (status, _, _) = http(loopback, "GET", "/healthz", &[], b"").await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status, 200);
    let errs: Vec<String> = stderr.try_iter().collect();
    assert!(errs.is_empty(), "logs on stderr: {errs:?}");

    // PUSHGATE_LISTEN beats PORT (a port we hold: binding it would fail).
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cmd = pushgate();
    cmd.arg("serve")
        .env("PORT", held.local_addr().unwrap().port().to_string())
        .env("PUSHGATE_LISTEN", "127.0.0.1:0")
        .env("PUSHGATE_PUBLISH_TOKEN", TOKEN);
    let p = Served::spawn(cmd);
    assert_eq!(p.addr.ip().to_string(), "127.0.0.1");
    drop(p);

    // A bad PORT or log output is a configuration error that names it.
    for (name, value) in [("PORT", "http"), ("PUSHGATE_LOG_OUTPUT", "syslog")] {
        let mut cmd = pushgate();
        cmd.arg("serve").env(name, value);
        let out = run(cmd);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{name}: {stderr}");
        assert!(stderr.contains(name), "{stderr}");
        assert!(!stderr.contains("listening"), "{stderr}");
    }
}

#[test]
fn health_probes_the_gateway_where_port_says_it_listens() {
    // The image's HEALTHCHECK: `pushgate health` with the container's environment.
    let mut cmd = pushgate();
    cmd.arg("serve")
        .env("PORT", "0")
        .env("PUSHGATE_PUBLISH_TOKEN", TOKEN);
    let mut p = Served::spawn(cmd);
    let health = |path: &str| {
        let mut cmd = pushgate();
        cmd.args(["health", "--path", path])
            .env("PORT", p.addr.port().to_string());
        run(cmd)
    };
    let out = health("/healthz");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = health("/readyz");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = health("/nope");
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("404"), "{}", text(&out.stderr));
    let _ = p.child.kill();
    let _ = p.child.wait();
    let out = health("/healthz");
    assert_eq!(out.status.code(), Some(1), "a dead gateway is not healthy");
}

/// A CA and a certificate it signed for `localhost`/127.0.0.1: (ca.pem, cert.pem, key.pem).
fn test_ca_and_server_cert() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "pushgate test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    let cert = params.signed_by(&key, &ca_cert, &ca_key).unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

#[tokio::test]
async fn rediss_urls_speak_tls_to_redis_trusting_the_system_roots() {
    // Managed Redis on the container platforms (App Platform's managed Valkey, Upstash's public
    // endpoints, ElastiCache with in-transit encryption) only speaks TLS: a rediss:// URL.
    // The roots are the system's (SSL_CERT_FILE here, as OpenSSL reads it: the test CA).
    let (ca, cert, key) = test_ca_and_server_cert();
    let (ca, cert, key) = (
        TempFile::new("ca.pem", &ca),
        TempFile::new("cert.pem", &cert),
        TempFile::new("key.pem", &key),
    );
    let (mut redis, port) = spawn_on_free_port("redis-server (TLS)", |port| {
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args(["--tls-cert-file", &cert.0.display().to_string()])
        .args(["--tls-key-file", &key.0.display().to_string()])
        .args(["--tls-ca-cert-file", &ca.0.display().to_string()])
        .args([
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        cmd
    });
    let end = Instant::now() + STARTUP;
    loop {
        let out = Command::new("redis-cli")
            .args(["--tls", "--cacert", &ca.0.display().to_string()])
            .args(["-p", &port.to_string(), "ping"])
            .output()
            .expect("redis-cli");
        if text(&out.stdout).trim() == "PONG" {
            break;
        }
        assert!(Instant::now() < end, "redis-server (TLS) did not start");
        std::thread::sleep(Duration::from_millis(10));
    }

    let mut cmd = pushgate();
    cmd.arg("serve")
        .env("PUSHGATE_LISTEN", "127.0.0.1:0")
        .env("PUSHGATE_PUBLISH_TOKEN", TOKEN)
        .env("PUSHGATE_REDIS_URL", format!("rediss://localhost:{port}/"))
        .env("SSL_CERT_FILE", &ca.0);
    let mut p = Served::spawn(cmd);
    let end = tokio::time::Instant::now() + STARTUP;
    loop {
        let (status, _, body) = http(p.addr, "GET", "/readyz", &[], b"").await;
        if status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "/readyz: {status} {}\n{}",
            text(&body),
            p.drain_log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let body = br#"{"topic":"room:tls","event":"new_msg","payload":{}}"#;
    let auth = format!("Bearer {TOKEN}");
    let (status, _, answer) = http(
        p.addr,
        "POST",
        "/api/publish",
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        body,
    )
    .await;
    assert_eq!(status, 200, "{}\n{}", text(&answer), p.drain_log());
    let _ = redis.kill();
    let _ = redis.wait();
}

// ---------------------------------------------------------------------------------------------
// Shutdown
// ---------------------------------------------------------------------------------------------

const DRAIN_MS: u64 = 200;
const GRACE_MS: u64 = 3000;
/// Scheduling slack on top of the grace period (process exit, a loaded test machine).
const SLACK: Duration = Duration::from_millis(700);

/// Polls `/readyz` until it stops answering 200: returns "503" or "refused".
async fn wait_not_ready(addr: SocketAddr) -> &'static str {
    let end = tokio::time::Instant::now() + Duration::from_millis(GRACE_MS);
    loop {
        match try_http(addr, "GET", "/readyz", &[], b"").await {
            Err(_) => return "refused",
            Ok((503, head, body)) => {
                assert!(
                    head.to_ascii_lowercase()
                        .contains("content-type: application/json"),
                    "{head}"
                );
                assert!(
                    body_json(&body)["reason"].is_string(),
                    "503 with a JSON reason: {}",
                    String::from_utf8_lossy(&body)
                );
                return "503";
            }
            Ok((200, _, _)) => {
                assert!(
                    tokio::time::Instant::now() < end,
                    "/readyz still 200 while draining"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Ok((other, head, _)) => panic!("/readyz answered {other}: {head}"),
        }
    }
}

/// `n` clients joined to `topic`, each proven live by one broadcast.
async fn joined_clients(addr: SocketAddr, topic: &str, n: usize) -> Vec<Ws> {
    let mut clients = Vec::new();
    for i in 0..n {
        let mut ws = connect(addr).await;
        join(&mut ws, &(i + 1).to_string(), topic, "{}").await;
        clients.push(ws);
    }
    publish(addr, topic, "before", "1").await;
    for ws in &mut clients {
        assert_eq!(recv(ws).await[3], "before");
    }
    clients
}

/// Reads every client to its close frame concurrently; returns the close codes.
fn read_closes(clients: Vec<Ws>) -> tokio::task::JoinHandle<Vec<u16>> {
    tokio::spawn(async move {
        let tasks: Vec<_> = clients
            .into_iter()
            .map(|mut ws| tokio::spawn(async move { recv_close_then_end(&mut ws).await }))
            .collect();
        let mut codes = Vec::new();
        for t in tasks {
            codes.push(t.await.expect("client task"));
        }
        codes
    })
}

#[tokio::test]
async fn sigterm_closes_websockets_with_1012_turns_unready_and_exits_0_in_the_grace_period() {
    let mut cmd = pushgate();
    cmd.args(["serve", "--listen", "127.0.0.1:0"])
        .env("PUSHGATE_PUBLISH_TOKEN", TOKEN)
        .env("PUSHGATE_SHUTDOWN_DRAIN_MS", DRAIN_MS.to_string())
        .env("PUSHGATE_SHUTDOWN_GRACE_MS", GRACE_MS.to_string());
    let mut p = Served::spawn(cmd);
    let addr = p.addr;
    let (status, _, _) = http(addr, "GET", "/readyz", &[], b"").await;
    assert_eq!(status, 200);
    let clients = joined_clients(addr, "room:drain", 5).await;

    let t0 = Instant::now();
    p.sigterm();
    // Not ready (or not accepting) while it drains. The clients do not answer the close frames
    // yet, so the process is certainly still draining while this is checked.
    let how = wait_not_ready(addr).await;
    assert!(
        p.child.try_wait().unwrap().is_none(),
        "readiness ({how}) must turn before the process is gone"
    );
    // No new WebSocket is accepted during the drain.
    let url = format!("ws://{addr}/socket/websocket?vsn=2.0.0");
    assert!(
        tokio_tungstenite::connect_async(url).await.is_err(),
        "a WebSocket was accepted during the drain"
    );

    let codes = tokio::time::timeout(
        Duration::from_millis(GRACE_MS) + SLACK,
        read_closes(clients),
    )
    .await
    .expect("every client gets a close frame within the grace period")
    .unwrap();
    assert_eq!(codes, vec![1012; 5], "close codes (never 1000)");

    let status = loop {
        if let Some(status) = p.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            t0.elapsed() < Duration::from_millis(GRACE_MS) + SLACK,
            "still running {:?} after SIGTERM; log:\n{}",
            t0.elapsed(),
            p.drain_log()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(status.code(), Some(0), "log:\n{}", p.drain_log());
    assert!(
        t0.elapsed() < Duration::from_millis(GRACE_MS) + SLACK,
        "exit took {:?}",
        t0.elapsed()
    );
}

#[tokio::test]
async fn stopping_the_in_process_server_closes_websockets_with_1012_and_finishes_in_time() {
    let mut c = test_config();
    c.shutdown.drain_ms = DRAIN_MS;
    c.shutdown.grace_ms = GRACE_MS;
    let s = start_with(c).await;
    let clients = joined_clients(s.addr, "room:drain", 5).await;

    let t0 = Instant::now();
    s.stop.cancel();
    let closes = read_closes(clients);
    wait_not_ready(s.addr).await;
    let finished = tokio::time::timeout(Duration::from_millis(GRACE_MS) + SLACK, s.handle)
        .await
        .expect("run_app did not return within the grace period")
        .expect("server task");
    assert!(
        finished,
        "run_app reports tasks left over after the grace period"
    );
    assert!(
        t0.elapsed() < Duration::from_millis(GRACE_MS),
        "{:?}",
        t0.elapsed()
    );
    let codes = tokio::time::timeout(SLACK, closes).await.unwrap().unwrap();
    assert_eq!(codes, vec![1012; 5], "close codes (never 1000)");
    assert_eq!(
        s.app
            .metrics
            .connections_websocket
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

/// README: "WebSockets are closed with 1012 at random moments over `shutdown.drain_ms`", so
/// that clients do not all reconnect at once. 20 clients: every close comes within the drain
/// period, and they are spread over it (some in each half; all 20 within a third of the period
/// by chance has a probability of about 2e-8).
#[tokio::test]
async fn the_drain_spreads_its_1012_closes_over_drain_ms() {
    const DRAIN: Duration = Duration::from_millis(1500);
    let mut c = many_clients_config();
    c.shutdown.drain_ms = DRAIN.as_millis() as u64;
    c.shutdown.grace_ms = GRACE_MS;
    let s = start_with(c).await;
    let clients = joined_clients(s.addr, "room:spread", 20).await;

    let t0 = Instant::now();
    s.stop.cancel();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let code = recv_close(&mut ws).await;
                (code, t0.elapsed())
            })
        })
        .collect();
    let mut at = Vec::new();
    for t in tasks {
        let (code, when) = tokio::time::timeout(DRAIN + SLACK, t)
            .await
            .expect("every close within the drain period")
            .unwrap();
        assert_eq!(code, 1012);
        at.push(when);
    }
    at.sort();
    let (first, last) = (at[0], at[at.len() - 1]);
    assert!(
        last <= DRAIN + SLACK,
        "a close after the drain period: {at:?}"
    );
    assert!(
        last - first >= DRAIN / 3,
        "closes not spread over the drain period: {at:?}"
    );
    let half = DRAIN / 2;
    assert!(
        at.iter().any(|t| *t < half) && at.iter().any(|t| *t >= half),
        "closes all in one half of the drain period: {at:?}"
    );
}

#[test]
fn token_prints_a_connect_token_signed_with_auth_secret() {
    let secret = "a-connect-token-secret-of-32-bytes";
    let mut cmd = pushgate();
    cmd.args([
        "token",
        "--channel",
        "user:42",
        "--channel",
        "team:*",
        "--sub",
        "42",
    ])
    .env("PUSHGATE_AUTH_SECRET", secret);
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let token = text(&out.stdout).trim().to_string();
    let key = jsonwebtoken::DecodingKey::from_secret(secret.as_bytes()).unwrap();
    let validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    let claims = jsonwebtoken::decode::<serde_json::Value>(&token, &key, &validation)
        .unwrap()
        .claims;
    assert_eq!(claims["channels"], serde_json::json!(["user:42", "team:*"]));
    assert_eq!(claims["sub"], "42");
    let left = claims["exp"].as_u64().unwrap() - jsonwebtoken::get_current_timestamp();
    assert!((3500..=3600).contains(&left), "{left}");

    // Without a secret there is nothing to sign with.
    let mut cmd = pushgate();
    cmd.args(["token", "--channel", "user:42"]);
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        text(&out.stderr).contains("auth.secret"),
        "{}",
        text(&out.stderr)
    );
}
