//! The `pushgate` binary: command line, configuration, tracing, bind, run.
#![forbid(unsafe_code)]

use anyhow::Context;
use clap::{Parser, Subcommand};
use pushgate::{App, Config};
use std::path::PathBuf;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

/// Exit status for a bad configuration (sysexits EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "pushgate",
    version,
    about = "Real-time push gateway (Phoenix Channels V2)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// TOML configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// With --config: a file that does not exist means every key's default (the packaged
        /// unit passes it, so /etc/pushgate/pushgate.toml may be deleted); any other problem
        /// reading it still fails.
        #[arg(long, requires = "config")]
        config_optional: bool,
        /// Address to listen on (overrides server.listen and PUSHGATE_LISTEN).
        #[arg(long)]
        listen: Option<String>,
        /// Redis URL (overrides redis.url and PUSHGATE_REDIS_URL).
        #[arg(long)]
        redis: Option<String>,
        /// Edge mode: serve HTTPS (HTTP/1.1 and HTTP/2, WebSockets included) at this address
        /// with a certificate obtained by ACME TLS-ALPN-01 (sets tls.listen, acme.enabled and
        /// acme.challenge = "tls-alpn-01"; acme.domains must be configured).
        #[arg(long, value_name = "ADDR")]
        tls: Option<String>,
    },
    /// Print the effective configuration, or each problem with its key (exit 64).
    CheckConfig {
        /// TOML configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// As for serve: a --config file that does not exist means the defaults.
        #[arg(long, requires = "config")]
        config_optional: bool,
    },
    /// Probe the local gateway (exit 0 when `GET /healthz` answers 200): the image's
    /// HEALTHCHECK, which has no shell or curl to run. Connects where `serve` would listen
    /// (loopback when that is every interface).
    Health {
        /// TOML configuration file (for server.listen; PORT and PUSHGATE_LISTEN work too).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Path to probe, e.g. /readyz.
        #[arg(long, default_value = "/healthz")]
        path: String,
    },
    /// Print a connect token for private topics, signed with auth.secret (for trying them out;
    /// your backend mints its own).
    Token {
        /// TOML configuration file (for auth.secret; PUSHGATE_AUTH_SECRET works too).
        #[arg(long)]
        config: Option<PathBuf>,
        /// A topic pattern the token grants (repeat for more), e.g. 'user:42'.
        #[arg(long = "channel", required = true, value_name = "PATTERN")]
        channels: Vec<String>,
        /// The `sub` claim: who the token is for.
        #[arg(long)]
        sub: Option<String>,
        /// Seconds until the token expires.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
}

/// Where logs go: stderr (the default: a terminal, journald) or stdout (what container
/// platforms collect first; the image sets it). From `PUSHGATE_LOG_OUTPUT`.
#[derive(Clone, Copy, PartialEq)]
enum LogOutput {
    Stderr,
    Stdout,
}

fn log_output() -> Result<LogOutput, pushgate::config::Problem> {
    match std::env::var("PUSHGATE_LOG_OUTPUT").as_deref() {
        Err(_) | Ok("stderr") => Ok(LogOutput::Stderr),
        Ok("stdout") => Ok(LogOutput::Stdout),
        Ok(other) => Err(pushgate::config::Problem {
            key: "PUSHGATE_LOG_OUTPUT".into(),
            message: format!("{other:?}: expected stderr or stdout"),
        }),
    }
}

/// The --config file, unless it does not exist and --config-optional says that is fine.
fn config_file(config: Option<PathBuf>, optional: bool) -> Option<PathBuf> {
    config.filter(|p| !(optional && matches!(p.try_exists(), Ok(false))))
}

/// Loads the file and environment, applies `adjust` (command-line flags), then validates.
fn load(file: Option<&PathBuf>, adjust: impl FnOnce(&mut Config)) -> Result<Config, ExitCode> {
    let config = Config::load(file.map(|p| p.as_path()), std::env::vars()).and_then(|mut c| {
        adjust(&mut c);
        let mut problems = c.validate().err().unwrap_or_default();
        problems.extend(log_output().err());
        if problems.is_empty() {
            Ok(c)
        } else {
            Err(problems)
        }
    });
    config.map_err(|problems| {
        for p in problems {
            eprintln!("config error: {p}");
        }
        ExitCode::from(EXIT_CONFIG)
    })
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PUSHGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = std::env::var("PUSHGATE_LOG_FORMAT").as_deref() == Ok("json");
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    // `load()` has already refused a bad PUSHGATE_LOG_OUTPUT.
    if log_output() == Ok(LogOutput::Stdout) {
        let builder = builder
            .with_writer(std::io::stdout)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
        if json {
            builder.json().init();
        } else {
            builder.init();
        }
    } else {
        let builder = builder
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
        if json {
            builder.json().init();
        } else {
            builder.init();
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig {
            config,
            config_optional,
        } => match load(config_file(config, config_optional).as_ref(), |_| {}) {
            Ok(mut c) => {
                if !c.publish.token.is_empty() {
                    c.publish.token = "(set, hidden)".into();
                }
                if !c.auth.secret.is_empty() {
                    c.auth.secret = "(set, hidden)".into();
                }
                c.redis.url = hide_password(&c.redis.url);
                if !c.redis.sentinel_password.is_empty() {
                    c.redis.sentinel_password = "(set, hidden)".into();
                }
                match toml::to_string_pretty(&c) {
                    Ok(text) => print!("{text}"),
                    Err(e) => eprintln!("cannot print the configuration: {e}"),
                }
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Health { config, path } => {
            let c = match load(config.as_ref(), |_| {}) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match probe(c.listen_addr(), &path) {
                Ok(200) => ExitCode::SUCCESS,
                Ok(status) => {
                    eprintln!("{path}: {status}");
                    ExitCode::from(1)
                }
                Err(e) => {
                    eprintln!("{path}: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Token {
            config,
            channels,
            sub,
            ttl,
        } => {
            let c = match load(config.as_ref(), |_| {}) {
                Ok(c) => c,
                Err(code) => return code,
            };
            if c.auth.secret.is_empty() {
                eprintln!(
                    "config error: auth.secret: not set (PUSHGATE_AUTH_SECRET); it signs the token"
                );
                return ExitCode::from(EXIT_CONFIG);
            }
            match pushgate::auth::mint(&c.auth.secret, sub.as_deref(), &channels, ttl) {
                Ok(token) => {
                    println!("{token}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Serve {
            config,
            config_optional,
            listen,
            redis,
            tls,
        } => {
            let c = match load(config_file(config, config_optional).as_ref(), |c| {
                if let Some(l) = listen {
                    c.server.listen = l;
                }
                if let Some(r) = redis {
                    c.redis.url = r;
                }
                if let Some(addr) = tls {
                    c.tls.listen = addr;
                    c.acme.enabled = true;
                    c.acme.challenge = pushgate::config::AcmeChallenge::TlsAlpn01;
                }
            }) {
                Ok(c) => c,
                Err(code) => return code,
            };
            // Before any thread exists: listenfd clears LISTEN_FDS/LISTEN_PID from the environment.
            let inherited = match pushgate::systemd::take_listeners() {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(1);
                }
            };
            init_tracing();
            match serve(c, inherited) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

/// `GET path` on the gateway listening at `listen` (its loopback when `listen` is every
/// interface); returns the HTTP status. Plain blocking I/O with a 2 s deadline per step.
fn probe(listen: std::net::SocketAddr, path: &str) -> std::io::Result<u16> {
    use std::io::{Read, Write};
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let deadline = std::time::Duration::from_secs(2);
    let mut stream = std::net::TcpStream::connect_timeout(&addr, deadline)?;
    stream.set_read_timeout(Some(deadline))?;
    stream.set_write_timeout(Some(deadline))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        match stream.read(&mut head[n..])? {
            0 => break,
            k => n += k,
        }
    }
    let line = String::from_utf8_lossy(&head[..n]);
    line.split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer from {addr}: {line:?}")))
}

/// `url` with the password of its user part (`redis://:PASSWORD@host/`) replaced by `hidden`.
fn hide_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_string();
    };
    match rest[..at].split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:hidden{}", &rest[at..]),
        None => url.to_string(),
    }
}

/// Runs the gateway on `inherited` (sockets passed by systemd) or, when there are none, on a
/// listener bound to `server.listen`.
fn serve(config: Config, inherited: Vec<std::net::TcpListener>) -> anyhow::Result<bool> {
    // One worker thread means a single-threaded runtime: no work-stealing machinery at all,
    // which is what a one-core droplet (or a server pinned to one core) wants.
    let mut rt = if config.server.worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if config.server.worker_threads > 1 {
        rt.worker_threads(config.server.worker_threads);
    }
    let rt = rt.enable_all().build().context("starting the runtime")?;
    rt.block_on(async move {
        // The signal handlers go in before anything listens: a SIGTERM that came between
        // "listening" and their installation killed the process undrained (the default action).
        let signals = ShutdownSignals::install().context("installing the signal handlers")?;
        let mut inherited: Vec<tokio::net::TcpListener> = inherited
            .into_iter()
            .map(tokio::net::TcpListener::from_std)
            .collect::<Result<_, _>>()
            .context("adopting a socket passed by systemd")?;
        // The edge's own sockets among them (pushgate.socket in the edge mode): they serve
        // tls.listen and tls.redirect_listen.
        let passed = pushgate::tls::Passed::take(&mut inherited, &config.tls);
        let listeners = if inherited.is_empty() {
            let addr = config.listen_addr();
            let listener = pushgate::listener::bind(&addr.to_string())
                .await
                .with_context(|| format!("binding {addr} (server.listen)"))?;
            vec![listener]
        } else {
            tracing::info!(
                count = inherited.len(),
                "using the sockets passed by systemd (LISTEN_FDS); server.listen is not used"
            );
            inherited
        };
        let mut addrs = Vec::with_capacity(listeners.len());
        for l in &listeners {
            addrs.push(l.local_addr()?);
        }
        let local = addrs[0];
        let generated = config.publish.token.is_empty();
        let app = App::new(config, CancellationToken::new());
        if cfg!(feature = "autobahn-echo") {
            // Before "listening", which tests wait for.
            tracing::warn!(
                "conformance build (feature autobahn-echo): WebSocket messages are echoed, not \
                 handled as Phoenix; never deploy this binary"
            );
        }
        for addr in &addrs {
            tracing::info!(%addr, broker = app.broker.name(), "listening");
        }
        // A generated token is shown only on a terminal: a log that is not one (journald, a
        // file) would keep the secret for anyone who can read it.
        if generated && !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            tracing::warn!(
                "no publish token configured (PUSHGATE_PUBLISH_TOKEN or publish.token): generated \
                 one for this run, not shown because the log is not a terminal; set one to publish"
            );
        } else if generated {
            tracing::info!(
                token = %app.publish_token,
                "no publish token configured (PUSHGATE_PUBLISH_TOKEN); generated one for this run"
            );
            tracing::info!(
                "try: curl -H 'Authorization: Bearer {}' -H 'Content-Type: application/json' -d '{{\"topic\":\"room:lobby\",\"event\":\"new_msg\",\"payload\":{{\"body\":\"hello\"}}}}' http://{}/api/publish",
                app.publish_token,
                local
            );
        }
        if let Some(every) = pushgate::systemd::watchdog_interval() {
            tokio::spawn(pushgate::systemd::watchdog(every));
        }
        // Listening (connections queue in the backlog from here on); once the broker is ready
        // too (at once for the embedded one, when the Redis subscriber is up otherwise), tell
        // systemd (Type=notify). STOPPING=1 follows when the drain begins.
        let ready_app = app.clone();
        tokio::spawn(async move {
            while ready_app.broker.readiness().is_err() && !ready_app.is_draining() {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            if !ready_app.is_draining() {
                pushgate::systemd::notify_ready(&format!("listening on {local}"));
            }
        });
        let shutdown = async {
            signals.recv().await;
            pushgate::systemd::notify_stopping();
        };
        Ok(pushgate::run_app_passed(listeners, passed, app, shutdown).await)
    })
}

/// SIGTERM and SIGINT (Ctrl-C), listened for from [`ShutdownSignals::install`] on.
struct ShutdownSignals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn install() -> std::io::Result<ShutdownSignals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(ShutdownSignals {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        Ok(ShutdownSignals {})
    }

    /// The first of them.
    async fn recv(mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}
