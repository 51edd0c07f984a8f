//! Helpers the backends' URL parsers share, so that every scheme reads its parameters the same
//! way (the table is in the docs of `locker::connect`). Public for authors of backends.

use std::time::Duration;

use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};

/// A duration from the URL parameter `name`: a number with a unit (`1500ms`, `2s`, `1m`, as
/// `humantime` reads them) or a bare number of seconds (`5`, `0.5`); more than zero.
///
/// ```
/// # extern crate locker_core as locker;
/// use std::time::Duration;
/// use locker::url_params::duration;
///
/// assert_eq!(duration("busy_timeout", "1m"), Ok(Duration::from_secs(60)));
/// assert_eq!(duration("busy_timeout", "0.5"), Ok(Duration::from_millis(500)));
/// assert!(duration("busy_timeout", "soon").unwrap_err().contains("busy_timeout"));
/// ```
///
/// # Errors
/// A message naming the parameter and the value, for an `InvalidInput` error.
pub fn duration(name: &str, value: &str) -> Result<Duration, String> {
    let bad = || format!("{name} {value:?} is not a duration such as 1500ms, 2s or 1m");
    let d = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        value
            .parse::<f64>()
            .ok()
            .filter(|s| *s < 1e9)
            .map(Duration::from_secs_f64)
            .ok_or_else(bad)?
    } else {
        humantime::parse_duration(value).map_err(|_| bad())?
    };
    if d.is_zero() {
        return Err(format!("{name} must be greater than zero"));
    }
    Ok(d)
}

/// What a raw user info may hold that a URL's may not. `%` is left alone (percent-escapes stay
/// escapes), and so is `:` (the first one ends the user).
const USERINFO_RAW: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}')
    .add(b'/')
    .add(b'@')
    .add(b'[')
    .add(b'\\')
    .add(b']')
    .add(b'^')
    .add(b'|');

/// The user info of a URL (what comes before its last `@`, without it) made readable by the
/// `url` crate: a password may hold a raw `/`, `?`, `#` or `@`, which are percent-encoded here;
/// percent-escapes already there are kept.
///
/// ```
/// # extern crate locker_core as locker;
/// use locker::url_params::encode_raw_userinfo;
///
/// assert_eq!(encode_raw_userinfo("u:p/?#@x%41"), "u:p%2F%3F%23%40x%41");
/// ```
pub fn encode_raw_userinfo(userinfo: &str) -> String {
    utf8_percent_encode(userinfo, USERINFO_RAW).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_have_units_or_are_seconds() {
        for (value, expected) in [
            ("2s", Duration::from_secs(2)),
            ("1m", Duration::from_secs(60)),
            ("1500ms", Duration::from_millis(1500)),
            ("1m 30s", Duration::from_secs(90)),
            ("1.5s", Duration::from_millis(1500)),
            ("5", Duration::from_secs(5)),
            ("0.25", Duration::from_millis(250)),
        ] {
            assert_eq!(duration("t", value), Ok(expected), "{value}");
        }
        for value in ["", "0", "0s", "soon", "-1", "1e3", "5 parsecs", "1.2.3"] {
            let e = duration("busy_timeout", value).expect_err(value);
            assert!(e.contains("busy_timeout"), "{e}");
        }
    }
}
