//! Property tests (a brief fuzzing run in CI) of everything that parses outside data: owner
//! hashes, records, and backend URLs. Nothing panics; what parses round-trips.

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn owner_hashes_round_trip_or_are_refused(
        key in "\\PC{1,40}|[@#/{}\\n\\r\\t a-z0-9]{1,40}",
        trace in proptest::option::of("\\PC{0,20}|[@#/.0-9a-z]{0,20}"),
    ) {
        let process = "host-1/4242.1234567";
        match locker::new_owner_hash(&key, process, trace.as_deref()) {
            Ok(hash) => {
                let parsed = locker::parse_owner_hash(&hash).expect("what is made parses");
                prop_assert_eq!(parsed.key, key.as_str());
                prop_assert_eq!(parsed.process_hash, process);
            }
            // Refused, with a typed error, only when the trace would make it ambiguous.
            Err(e) => prop_assert_eq!(e.kind(), locker::ErrorKind::InvalidInput),
        }
    }

    #[test]
    fn any_text_parses_as_an_owner_hash_or_not_without_panicking(s in "\\PC*") {
        let _ = locker::parse_owner_hash(&s);
    }

    #[test]
    fn any_stored_value_is_a_record_or_a_typed_corrupt_error(s in "\\PC*|\\{\"ownerHash\":\\PC*") {
        for result in [
            locker::LockData::from_json(&s).map(drop),
            locker::ProcessData::from_json(&s).map(drop),
        ] {
            if let Err(e) = result {
                prop_assert_eq!(e.kind(), locker::ErrorKind::Corrupt);
            }
        }
    }

    #[test]
    fn records_round_trip(
        owner in "\\PC{1,30}",
        process in "\\PC{1,30}",
        trace in proptest::option::of("\\PC{1,10}"),
        token in proptest::option::of(0u64..(1 << 53)),
    ) {
        let mut d = locker::LockData::new(owner, process, trace);
        d.fencing_token = token;
        let back = locker::LockData::from_json(&d.to_json()).expect("own JSON parses");
        prop_assert_eq!(back, d);
    }

    #[test]
    fn any_url_connects_or_is_a_typed_error(
        url in "(redis|rediss|redis\\+cluster|rediss\\+cluster|redis-cluster|rediss-cluster|postgres|postgresql|sqlite|etcd|etcds|memory|http)://\\PC{0,40}|(sqlite|redis|etcd|postgres)://[a-z:,/?#@%=&0-9.\\[\\]]{0,40}|\\PC{0,40}",
    ) {
        if let Err(e) = locker::connect(&url) {
            prop_assert_eq!(e.kind(), locker::ErrorKind::InvalidInput, "{}", e);
            // A URL's password never leaks into the error.
            prop_assert!(!e.to_string().contains("hunter2"));
        }
    }

    #[test]
    fn passwords_never_leak_from_url_errors(rest in "[:/?#@a-z0-9]{0,20}") {
        for scheme in ["redis", "rediss+cluster", "postgres", "etcd"] {
            let url = format!("{scheme}://user:hunter2{rest}");
            if let Err(e) = locker::connect(&url) {
                prop_assert!(!e.to_string().contains("hunter2"), "{}", e);
            }
        }
    }

    #[test]
    fn passwords_with_delimiters_never_leak(
        before in "[:/?#@%=&a-z0-9]{0,8}",
        rest in "[:/?#@%=&,\\[\\]a-z0-9]{0,12}",
        after in "[:/?#@%=&,\\[\\]a-z0-9]{0,20}",
    ) {
        // Whatever follows, the text up to the last '@' is the user info.
        for scheme in ["redis", "rediss+cluster", "postgres", "etcd"] {
            let url = format!("{scheme}://user:{before}hunter2{rest}@{after}");
            if let Err(e) = locker::connect(&url) {
                prop_assert!(!e.to_string().contains("hunter2"), "{}", e);
            }
        }
    }
}

// The helpers below serve the round trips of the backends compiled in.

/// Percent-encodes all but letters and digits, as a careful user (or a URL library) would.
#[allow(dead_code)]
fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// As a form encodes a query value (`+` for a space).
#[allow(dead_code)]
fn form(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// `connect` accepts `url` exactly when the backend's `from_url` does.
#[allow(dead_code)]
fn connect_agrees<T>(url: &str, parsed: &locker::Result<T>) -> Result<(), TestCaseError> {
    let connected = locker::connect(url);
    prop_assert_eq!(connected.is_ok(), parsed.is_ok(), "{}", url);
    if let (Err(a), Err(b)) = (connected, parsed) {
        prop_assert_eq!(a.to_string(), b.to_string());
    }
    Ok(())
}

// What parses round-trips: URLs made of arbitrary parts, encoded or raw, give those parts back,
// through the backend's `from_url` and `locker::connect` alike.
proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[cfg(any(feature = "redis", feature = "fred"))]
    #[test]
    fn redis_urls_round_trip(
        user in "\\PC{0,8}",
        password in "\\PC{0,12}",
        raw_password in "[a-zA-Z0-9?/#@:!$&'()*+,;=]{0,12}",
        hosts in proptest::collection::vec(("[a-z][a-z0-9-]{0,8}", 1u16..), 1..4),
        database in 0i64..16,
        prefix in "\\PC{0,12}",
        millis in 1u64..10_000_000,
        raw in any::<bool>(),
    ) {
        let cluster = hosts.len() > 1;
        let password = if raw { raw_password } else { password };
        let auth = match raw {
            true => format!("{}:{password}@", enc(&user)),
            false => format!("{}:{}@", enc(&user), enc(&password)),
        };
        let list: Vec<String> = hosts.iter().map(|(h, p)| format!("{h}:{p}")).collect();
        let path = if cluster { String::new() } else { format!("/{database}") };
        let url = format!(
            "redis://{auth}{}{path}?prefix={}&command_timeout={millis}ms",
            list.join(","),
            form(&prefix),
        );
        let parsed = locker::redis::RedisConfig::from_url(&url);
        connect_agrees(&url, &parsed)?;
        match parsed {
            Ok(c) => {
                prop_assert_eq!(c.username(), (!user.is_empty()).then_some(user.as_str()));
                prop_assert_eq!(c.nodes(), hosts);
                prop_assert_eq!(c.database(), if cluster { 0 } else { database });
                prop_assert_eq!(c.key_prefix(), prefix.as_str());
                prop_assert_eq!(c.command_timeout(), std::time::Duration::from_millis(millis));
                prop_assert_eq!(c.is_cluster(), cluster);
                // (Unless the password is also part of what may show: the user name, a host.)
                let shown_elsewhere = user.contains(&password)
                    || prefix.contains(&password)
                    || c.nodes().iter().any(|(h, _)| h.contains(&password));
                if password.len() > 3 && !shown_elsewhere {
                    let shown = format!("{:?}", c);
                    prop_assert!(!shown.contains(&password), "the password shows");
                }
            }
            // Only a key prefix with a broken hash tag is refused.
            Err(e) => prop_assert!(prefix.contains(['{', '}']), "{}: {}", url, e),
        }
    }

    #[cfg(feature = "etcd")]
    #[test]
    fn etcd_urls_round_trip(
        user in "\\PC{0,8}",
        password in "\\PC{0,12}",
        hosts in proptest::collection::vec(("[a-z][a-z0-9-]{0,8}", 1u16..), 1..4),
        prefix in "\\PC{0,12}",
        secs in 1u64..100_000,
        tls in any::<bool>(),
    ) {
        let scheme = if tls { "etcds" } else { "etcd" };
        let list: Vec<String> = hosts.iter().map(|(h, p)| format!("{h}:{p}")).collect();
        let url = format!(
            "{scheme}://{}:{}@{}?prefix={}&connect_timeout={secs}s",
            enc(&user),
            enc(&password),
            list.join(","),
            form(&prefix),
        );
        let parsed = locker::etcd::EtcdConfig::from_url(&url);
        connect_agrees(&url, &parsed)?;
        let c = parsed.expect("a well-formed etcd URL parses");
        let http = if tls { "https" } else { "http" };
        let endpoints: Vec<String> =
            hosts.iter().map(|(h, p)| format!("{http}://{h}:{p}")).collect();
        prop_assert_eq!(c.endpoints(), endpoints.as_slice());
        prop_assert_eq!(c.username(), Some(user.as_str()));
        prop_assert_eq!(c.prefix(), prefix.as_str());
        prop_assert_eq!(c.connect_timeout(), std::time::Duration::from_secs(secs));
    }

    #[cfg(feature = "postgres")]
    #[test]
    fn postgres_urls_round_trip(
        user in "[a-z][a-z0-9_]{0,8}",
        password in "\\PC{0,12}",
        host in "[a-z][a-z0-9-]{0,8}",
        port in 1u16..,
        database in "[a-z][a-z0-9_]{0,8}",
        schema in "[a-zA-Z_][a-zA-Z0-9_]{0,10}",
        prefix in "([a-zA-Z_][a-zA-Z0-9_]{0,9})?",
        secs in 1u64..100_000,
    ) {
        let url = format!(
            "postgres://{user}:{}@{host}:{port}/{database}?schema={}&table_prefix={}&command_timeout={secs}&sslmode=require",
            enc(&password),
            enc(&schema),
            enc(&prefix),
        );
        let parsed = locker::postgres::PostgresConfig::from_url(&url);
        connect_agrees(&url, &parsed)?;
        let c = parsed.expect("a well-formed PostgreSQL URL parses");
        let o = c.connect_options();
        prop_assert_eq!(o.get_username(), user.as_str());
        prop_assert_eq!(o.get_host(), host.as_str());
        prop_assert_eq!(o.get_port(), port);
        prop_assert_eq!(o.get_database(), Some(database.as_str()));
        prop_assert_eq!(c.schema(), schema.as_str());
        prop_assert_eq!(c.table_prefix(), prefix.as_str());
        prop_assert_eq!(c.command_timeout(), std::time::Duration::from_secs(secs));
        // (Unless the password is also part of what may show.)
        let shown_elsewhere = [&user, &host, &database, &schema, &prefix]
            .iter()
            .any(|part| part.contains(password.as_str()));
        if password.len() > 3 && !shown_elsewhere {
            let shown = format!("{:?}", c);
            prop_assert!(!shown.contains(&password), "the password shows");
        }
    }

    #[cfg(feature = "sqlite")]
    #[test]
    fn sqlite_urls_round_trip(
        path in "[a-zA-Z0-9 ?#%@/._-]{1,20}",
        prefix in "[a-zA-Z_]{0,10}",
        millis in 1u64..10_000_000,
        form_style in 0..3,
    ) {
        prop_assume!(!path.starts_with(":memory:"));
        // `sqlite:` followed by `//` is the start of an authority (`sqlite://`), whatever
        // follows: such a path can only be written in the `sqlite://` forms.
        prop_assume!(!(form_style == 1 && path.starts_with("//")));
        let head = ["sqlite://", "sqlite:", "sqlite://"][form_style as usize];
        let url = format!(
            "{head}{}?table_prefix={}&busy_timeout={millis}ms",
            percent_encoding::utf8_percent_encode(&path, &PATH_ESCAPES),
            form(&prefix),
        );
        let parsed = locker::sqlite::SqliteConfig::from_url(&url);
        connect_agrees(&url, &parsed)?;
        let c = parsed.expect("a well-formed SQLite URL parses");
        prop_assert_eq!(c.path(), std::path::Path::new(&path));
        prop_assert_eq!(c.table_prefix(), prefix.as_str());
        prop_assert_eq!(c.busy_timeout(), std::time::Duration::from_millis(millis));
    }
}

/// What a SQLite path must escape in a URL: `?` (the query) and `%` (escapes).
#[allow(dead_code)]
const PATH_ESCAPES: percent_encoding::AsciiSet = percent_encoding::CONTROLS.add(b'?').add(b'%');
