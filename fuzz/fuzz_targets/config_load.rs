//! Config loading (`Config::load_text`: TOML, then `PUSHGATE_<SECTION>_<KEY>` variables) and
//! validation.
//!
//! Input: TOML text, a NUL byte, then `NAME=VALUE` lines for the environment.
//! Properties:
//! - loading and validating never panic, and a problem always names a key;
//! - a loaded configuration written back as TOML loads to an equal one (nothing is lost or
//!   changed between the file format and the settings);
//! - a variable means what the same key in the file means: `PUSHGATE_S_K=V` loads like a file
//!   with `K = V` in `[S]` (V typed as an integer, a boolean or else a string);
//! - a configuration that validates can be run: building the node's state from it (`App::new`,
//!   which trusts `validate`, e.g. for the Redis URL and the forward URL) does not panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pushgate::Config;
use pushgate_fuzz::Cursor;

fn toml_value(v: &str) -> toml::Value {
    if let Ok(i) = v.parse::<i64>() {
        toml::Value::Integer(i)
    } else if v == "true" || v == "false" {
        toml::Value::Boolean(v == "true")
    } else {
        toml::Value::String(v.to_string())
    }
}

fuzz_target!(|input: &[u8]| {
    let mut c = Cursor::new(input);
    let Ok(file) = std::str::from_utf8(c.until(0)) else {
        return;
    };
    let Ok(env_text) = std::str::from_utf8(c.rest()) else {
        return;
    };
    let env: Vec<(String, String)> = env_text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let loaded = Config::load_text(Some(("fuzz.toml", file)), env.clone());
    let config = match loaded {
        Ok(config) => config,
        Err(problems) => {
            assert!(!problems.is_empty());
            assert!(problems.iter().all(|p| !p.key.is_empty()));
            return;
        }
    };
    let written = toml::to_string(&config).expect("a loaded config serializes");
    let again = Config::load_text(Some(("again.toml", &written)), Vec::new())
        .unwrap_or_else(|p| panic!("written back, it does not load: {p:?}\n{written}"));
    assert_eq!(
        again, config,
        "written back, it loads differently:\n{written}"
    );

    // The variables, as file keys instead (only the simple ones: a section and a key).
    if env.is_empty() {
        let _ = config.listen_addr();
    } else if let Ok(mut table) = file.parse::<toml::Table>() {
        let mut simple = true;
        for (name, value) in &env {
            let Some(rest) = name.strip_prefix("PUSHGATE_") else {
                continue;
            };
            if matches!(name.as_str(), "PUSHGATE_LOG" | "PUSHGATE_LOG_FORMAT") {
                continue;
            }
            let (s, k) = match rest {
                "LISTEN" => ("server", "listen"),
                _ => rest.split_once('_').expect("loaded, so of that shape"),
            };
            match table
                .entry(s.to_ascii_lowercase())
                .or_insert_with(|| toml::Value::Table(Default::default()))
            {
                toml::Value::Table(t) => {
                    t.insert(k.to_ascii_lowercase(), toml_value(value));
                }
                _ => simple = false,
            }
        }
        if simple {
            let text = toml::to_string(&table).expect("a table serializes");
            let as_file = Config::load_text(Some(("as-file.toml", &text)), Vec::new());
            assert_eq!(
                as_file.as_ref().ok(),
                Some(&config),
                "variables read unlike the file"
            );
        }
    }

    if config.validate().is_ok() {
        let _ = config.listen_addr();
        pushgate_fuzz::block_on(async {
            let app = pushgate::App::new(config, tokio_util::sync::CancellationToken::new());
            drop(app);
        });
    }
});
