//! HTTP query strings, read the way the Phoenix clients write them: `a=1&b=2`, a name may
//! repeat, values stay raw (not percent-decoded; the values we read, `vsn` and tokens, never
//! need decoding). Used by the WebSocket upgrade, LongPoll and [`crate::auth`] for the connect
//! params. Pure, no I/O, no allocation.

/// Every value of the query parameter `name`, in order (raw, not percent-decoded).
pub fn query_values<'a>(query: &'a str, name: &str) -> impl DoubleEndedIterator<Item = &'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .filter(move |(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// A query parameter's last occurrence, if any (`vsn`; LongPoll's session `token`).
pub fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query_values(query, name).next_back()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_param_takes_the_last_value() {
        assert_eq!(query_param("a=1&vsn=2.0.0&", "vsn"), Some("2.0.0"));
        assert_eq!(query_param("token=a&vsn=2.0.0&token=b", "token"), Some("b"));
        assert_eq!(query_param("", "vsn"), None);
    }

    #[test]
    fn query_values_come_in_order_and_a_bare_name_is_empty() {
        let all: Vec<_> = query_values("token=a&vsn=2.0.0&token&token=b", "token").collect();
        assert_eq!(all, ["a", "", "b"]);
        assert_eq!(query_values("tokens=a", "token").next(), None);
    }
}
