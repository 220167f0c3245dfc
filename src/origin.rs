//! Which web pages may use this gateway (`server.allowed_origins`). Pure, no I/O.
//!
//! A browser names the page behind every WebSocket handshake and every cross-origin request in
//! its `Origin` header (`scheme://host[:port]`, no path). With `server.allowed_origins` empty
//! (the default) any page may connect: pushgate holds no cookies or other ambient credentials a
//! foreign page could ride on, and public topics are public. Once it is set, a WebSocket upgrade
//! or LongPoll request whose `Origin` is not listed is refused with 403, and LongPoll's CORS
//! answers name only the listed origins.
//!
//! A request **without** an `Origin` header is let through: browsers always send one on a
//! WebSocket handshake and on cross-origin `fetch`/XHR, so its absence means a same-origin
//! LongPoll GET (browsers omit `Origin` there) or a client that is not a browser (a native app,
//! a backend, phoenix.js in Node), which could send any `Origin` it likes anyway. `Origin: null`
//! (sandboxed frames, `file:` pages) is a browser's and is refused.
//!
//! The check runs once per upgrade or request, never per message.

/// `server.allowed_origins`, prepared for matching.
#[derive(Debug, Clone, Default)]
pub struct Origins {
    rules: Vec<Rule>,
}

#[derive(Debug, Clone)]
enum Rule {
    /// `https://app.example.com[:port]`, lowercase.
    Exact(String),
    /// `https://*.example.com[:port]`: `scheme` is `https://`, `suffix` is `.example.com[:port]`
    /// (lowercase); one or more labels stand in for the `*`.
    Subdomains { scheme: String, suffix: String },
}

impl Origins {
    /// From validated patterns ([`check_pattern`]).
    pub fn new(patterns: &[String]) -> Origins {
        let rules = patterns
            .iter()
            .map(|p| {
                let p = p.to_ascii_lowercase();
                match p.split_once("://*") {
                    Some((scheme, suffix)) => Rule::Subdomains {
                        scheme: format!("{scheme}://"),
                        suffix: suffix.to_string(),
                    },
                    None => Rule::Exact(p),
                }
            })
            .collect();
        Origins { rules }
    }

    /// True when every origin is allowed (`server.allowed_origins` empty).
    pub fn is_open(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether a request with this `Origin` header (`None`: no such header) may proceed.
    pub fn allows(&self, origin: Option<&[u8]>) -> bool {
        match origin {
            None => true,
            Some(_) if self.is_open() => true,
            Some(o) => self.rules.iter().any(|r| r.matches(o)),
        }
    }
}

impl Rule {
    fn matches(&self, origin: &[u8]) -> bool {
        match self {
            Rule::Exact(e) => origin.eq_ignore_ascii_case(e.as_bytes()),
            Rule::Subdomains { scheme, suffix } => {
                let (s, suffix) = (scheme.as_bytes(), suffix.as_bytes());
                if origin.len() <= s.len() + suffix.len()
                    || !origin[..s.len()].eq_ignore_ascii_case(s)
                    || !origin[origin.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
                {
                    return false;
                }
                // What stands for `*`: DNS labels, nothing else (no port, path or user part).
                let labels = &origin[s.len()..origin.len() - suffix.len()];
                labels.split(|b| *b == b'.').all(|l| {
                    !l.is_empty() && l.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-')
                })
            }
        }
    }
}

/// A `server.allowed_origins` entry that is not `scheme://host[:port]`; shown as the entry
/// (quoted) and the shape it must have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?}: must be scheme://host[:port] with no path or trailing slash, like \
         https://app.example.com or https://*.example.com"
)]
pub struct BadOriginPattern(pub String);

/// Checks one `server.allowed_origins` entry: `scheme://host[:port]`, where the host may start
/// with `*.` (any subdomain, at any depth, not the bare domain).
pub fn check_pattern(p: &str) -> Result<(), BadOriginPattern> {
    let bad = || Err(BadOriginPattern(p.to_string()));
    let Some((scheme, rest)) = p.split_once("://") else {
        return bad();
    };
    let scheme_ok = scheme
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic())
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b));
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, _)) if !h.ends_with(']') && h.contains(':') => (rest, None),
        Some((h, port)) => (h, Some(port)),
        None => (rest, None),
    };
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.parse::<u16>().is_ok());
    let host = host.strip_prefix("*.").unwrap_or(host);
    let host_ok = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse::<std::net::Ipv6Addr>().is_ok() && !rest.starts_with("*.")
    } else {
        !host.is_empty()
            && host
                .split('.')
                .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
    };
    if !(scheme_ok && port_ok && host_ok) {
        return bad();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origins(p: &[&str]) -> Origins {
        for p in p {
            check_pattern(p).unwrap();
        }
        Origins::new(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn exact_and_subdomain_patterns() {
        let o = origins(&["https://app.example.com", "https://*.example.org:8443"]);
        let ok = |s: &str| o.allows(Some(s.as_bytes()));
        assert!(ok("https://app.example.com"));
        assert!(ok("HTTPS://App.Example.com"));
        assert!(!ok("http://app.example.com"));
        assert!(!ok("https://app.example.com:443"));
        assert!(!ok("https://app.example.com.evil.net"));
        assert!(!ok("https://evilapp.example.com"));
        assert!(ok("https://a.example.org:8443"));
        assert!(ok("https://a.b-c.example.org:8443"));
        assert!(!ok("https://example.org:8443"));
        assert!(!ok("https://.example.org:8443"));
        assert!(!ok("https://a.example.org"));
        assert!(!ok("https://evilexample.org:8443"));
        assert!(!ok("https://x:1@a.example.org:8443"));
        assert!(!ok("https://a/.example.org:8443"));
        assert!(!ok("null"));
        assert!(
            o.allows(None),
            "no Origin: not a browser's cross-origin request"
        );
        assert!(!o.is_open());
        let open = Origins::new(&[]);
        assert!(open.is_open() && open.allows(Some(b"https://anything.test")));
    }

    #[test]
    fn patterns_are_checked() {
        for good in [
            "https://app.example.com",
            "http://localhost:3000",
            "https://*.example.com",
            "http://[::1]:8080",
            "capacitor://localhost",
        ] {
            check_pattern(good).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in [
            "*",
            "null",
            "app.example.com",
            "https://app.example.com/",
            "https://app.example.com/path",
            "https://*",
            "https://a.*.example.com",
            "https://app.example.com:port",
            "https://",
            "://x",
        ] {
            assert!(check_pattern(bad).is_err(), "{bad}");
        }
        assert_eq!(
            check_pattern("https://app.example.com/")
                .unwrap_err()
                .to_string(),
            "\"https://app.example.com/\": must be scheme://host[:port] with no path or trailing \
             slash, like https://app.example.com or https://*.example.com"
        );
    }
}
