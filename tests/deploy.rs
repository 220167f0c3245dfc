//! The container image's defaults and the platform manifests under `deploy/` against the real
//! binary: every variable the `Dockerfile` and each manifest set is a config variable that
//! `check-config` accepts (with the image's `ENV` under the manifest's, as the platform runs the
//! image), pushgate then listens on `0.0.0.0` at the port the platform routes to, the health
//! check paths are ones pushgate serves, and the drain ends inside the platform's grace period.
//! The manifests cannot be deployed here; this keeps them from drifting from the binary.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};

type Env = BTreeMap<String, String>;

/// Fly.io's default `kill_timeout` when fly.toml sets none (the shortest of the platforms').
const FLY_DEFAULT_KILL_TIMEOUT_S: u64 = 5;
/// App Platform's default `grace_period_seconds`.
const APP_PLATFORM_DEFAULT_GRACE_S: u64 = 120;

fn read(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

fn unquote(v: &str) -> String {
    v.trim().trim_matches('"').to_string()
}

/// The `ENV` instructions of the Dockerfile (`ENV A=1 \` continued over lines).
fn dockerfile_env() -> Env {
    let text = read("Dockerfile").replace("\\\n", " ");
    let mut env = Env::new();
    for line in text.lines() {
        if let Some(rest) = line.trim().strip_prefix("ENV ") {
            for pair in rest.split_whitespace() {
                let (k, v) = pair.split_once('=').expect("ENV KEY=value");
                env.insert(k.to_string(), unquote(v));
            }
        }
    }
    env
}

/// `check-config` with `env` (nothing else of the test's environment that pushgate reads);
/// returns the printed config, failing the test with pushgate's message when it refuses.
fn check_config(label: &str, env: &Env) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pushgate"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("PUSHGATE_") || k == "PORT" {
            cmd.env_remove(k);
        }
    }
    cmd.arg("check-config")
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = cmd.output().expect("run pushgate check-config");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{label}: check-config refused {env:?}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The value of `key = ...` in `section` of check-config's TOML output.
fn printed(config: &str, section: &str, key: &str) -> String {
    let table: toml::Table = config.parse().expect("check-config prints TOML");
    match &table[section][key] {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Checks what every platform needs of pushgate, given the image's `ENV` under `manifest`.
fn check_platform(label: &str, manifest: &Env, port: u16, grace_s: u64, health: &[&str]) {
    let mut env = dockerfile_env();
    env.extend(manifest.clone());
    // The platform sets PORT to the port it routes to.
    env.insert("PORT".into(), port.to_string());
    let config = check_config(label, &env);
    assert_eq!(
        printed(&config, "server", "listen"),
        format!("0.0.0.0:{port}"),
        "{label}: listens where the platform routes"
    );
    let grace_ms: u64 = printed(&config, "shutdown", "grace_ms").parse().unwrap();
    let drain_ms: u64 = printed(&config, "shutdown", "drain_ms").parse().unwrap();
    assert!(
        drain_ms <= grace_ms && grace_ms < grace_s * 1000,
        "{label}: drain {drain_ms} ms and exit within {grace_ms} ms must end inside the \
         platform's {grace_s} s grace period"
    );
    for path in health {
        assert!(
            ["/healthz", "/readyz"].contains(path),
            "{label}: health check path {path} is not one pushgate serves"
        );
    }
}

#[test]
fn the_image_defaults_listen_on_port_and_drain_inside_flys_default_kill_timeout() {
    let env = dockerfile_env();
    for key in [
        "PORT",
        "PUSHGATE_LOG_FORMAT",
        "PUSHGATE_LOG_OUTPUT",
        "PUSHGATE_SHUTDOWN_DRAIN_MS",
        "PUSHGATE_SHUTDOWN_GRACE_MS",
    ] {
        assert!(env.contains_key(key), "Dockerfile sets no {key}: {env:?}");
    }
    assert_eq!(env["PUSHGATE_LOG_FORMAT"], "json");
    assert_eq!(env["PUSHGATE_LOG_OUTPUT"], "stdout");
    let port: u16 = env["PORT"].parse().unwrap();
    // Run as Fly runs an image whose fly.toml says nothing: its default 5 s kill timeout.
    check_platform(
        "Dockerfile",
        &Env::new(),
        port,
        FLY_DEFAULT_KILL_TIMEOUT_S,
        &[],
    );
    let text = read("Dockerfile");
    assert!(
        text.contains("EXPOSE 8080") && port == 8080,
        "EXPOSE and PORT agree"
    );
}

#[test]
fn fly_toml_fits_the_binary() {
    let fly: toml::Table = read("deploy/fly/fly.toml")
        .parse()
        .expect("fly.toml is TOML");
    let mut env = Env::new();
    for (k, v) in fly["env"].as_table().expect("[env]") {
        env.insert(k.clone(), v.as_str().expect("string values").to_string());
    }
    let service = fly["http_service"].as_table().expect("[http_service]");
    let port = u16::try_from(service["internal_port"].as_integer().unwrap()).unwrap();
    let kill_timeout = fly
        .get("kill_timeout")
        .map_or(FLY_DEFAULT_KILL_TIMEOUT_S, |v| {
            v.as_integer().unwrap() as u64
        });
    let signal = fly
        .get("kill_signal")
        .and_then(|v| v.as_str())
        .unwrap_or("SIGINT");
    assert!(
        ["SIGINT", "SIGTERM"].contains(&signal),
        "pushgate drains on SIGINT and SIGTERM only, fly.toml sends {signal}"
    );
    let checks = service["checks"]
        .as_array()
        .expect("[[http_service.checks]]");
    let paths: Vec<&str> = checks.iter().map(|c| c["path"].as_str().unwrap()).collect();
    // Secrets the README sets with `fly secrets set`.
    env.insert(
        "PUSHGATE_REDIS_URL".into(),
        "redis://default:secret@fly-pushgate.upstash.io:6379".into(),
    );
    env.insert(
        "PUSHGATE_PUBLISH_TOKEN".into(),
        "0123456789abcdef0123".into(),
    );
    check_platform("fly.toml", &env, port, kill_timeout, &paths);
}

#[test]
fn the_app_platform_spec_fits_the_binary() {
    let text = read("deploy/digitalocean/app.yaml");
    let mut env = Env::new();
    let mut key: Option<String> = None;
    let (mut port, mut grace_s, mut paths) = (None, APP_PLATFORM_DEFAULT_GRACE_S, vec![]);
    for line in text.lines().map(str::trim) {
        if let Some(k) = line.strip_prefix("- key: ") {
            key = Some(unquote(k));
        } else if let (Some(v), Some(k)) = (line.strip_prefix("value: "), key.as_ref()) {
            // ${redis.DATABASE_URL}: what App Platform puts there for a managed Valkey.
            let v = unquote(v).replace(
                "${redis.DATABASE_URL}",
                "rediss://default:secret@pushgate-valkey-do-user-1-0.db.ondigitalocean.com:25061",
            );
            env.insert(k.clone(), v);
            key = None;
        } else if let Some(p) = line.strip_prefix("http_port: ") {
            port = Some(p.parse::<u16>().unwrap());
        } else if let Some(s) = line.strip_prefix("grace_period_seconds: ") {
            grace_s = s.parse().unwrap();
        } else if let Some(p) = line.strip_prefix("http_path: ") {
            paths.push(unquote(p));
        }
    }
    assert!(env.contains_key("PUSHGATE_REDIS_URL"), "{env:?}");
    let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
    assert!(!paths.is_empty(), "app.yaml has a health check");
    check_platform("app.yaml", &env, port.expect("http_port"), grace_s, &paths);
}

#[test]
fn the_app_runner_template_fits_the_binary() {
    let text = read("deploy/apprunner/pushgate.yaml");
    let mut env = Env::new();
    let mut name: Option<String> = None;
    let (mut port, mut paths) = (None, vec![]);
    // Stand-ins for the template's parameters.
    let parameter = |v: &str| match v.trim() {
        "!Ref RedisUrl" => "redis://pushgate.abc123.0001.euw1.cache.amazonaws.com:6379/".into(),
        "!Ref PublishToken" => "0123456789abcdef0123".into(),
        other => unquote(other),
    };
    for line in text.lines().map(str::trim) {
        if let Some(inline) = line
            .strip_prefix("- { Name: ")
            .and_then(|l| l.strip_suffix(" }"))
        {
            let (k, v) = inline
                .split_once(", Value: ")
                .expect("{ Name: K, Value: V }");
            env.insert(k.to_string(), parameter(v));
        } else if let Some(k) = line.strip_prefix("- Name: ") {
            name = Some(k.to_string());
        } else if let (Some(v), Some(k)) = (line.strip_prefix("Value: "), name.as_ref()) {
            env.insert(k.clone(), parameter(v));
            name = None;
        } else if let Some(p) = line.strip_prefix("Port: ") {
            port = Some(unquote(p).parse::<u16>().unwrap());
        } else if let Some(p) = line.strip_prefix("Path: ") {
            paths.push(unquote(p));
        }
    }
    assert_eq!(
        env.get("PUSHGATE_WEBSOCKET_ENABLED").map(String::as_str),
        Some("false"),
        "App Runner passes no WebSocket: upgrades are answered 404 at once"
    );
    let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
    assert!(!paths.is_empty(), "the template has a health check");
    // App Runner documents no grace period after SIGTERM: hold it to the shortest of the others.
    check_platform(
        "App Runner",
        &env,
        port.expect("Port"),
        FLY_DEFAULT_KILL_TIMEOUT_S,
        &paths,
    );
}
