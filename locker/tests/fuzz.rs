//! Property tests (a brief fuzzing run in CI) of everything that parses outside data: owner
//! hashes, records, and backend URLs. Nothing panics; what parses round-trips.

use proptest::prelude::*;

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
        url in "(redis|rediss|redis\\+cluster|postgres|sqlite|etcd|etcds|memory|http)://\\PC{0,40}|\\PC{0,40}",
    ) {
        if let Err(e) = locker::connect(&url) {
            prop_assert_eq!(e.kind(), locker::ErrorKind::InvalidInput, "{}", e);
            // A URL's password never leaks into the error.
            prop_assert!(!e.to_string().contains("hunter2"));
        }
    }

    #[test]
    fn passwords_never_leak_from_url_errors(rest in "[:/?#@a-z0-9]{0,20}") {
        for scheme in ["redis", "postgres", "etcd"] {
            let url = format!("{scheme}://user:hunter2{rest}");
            if let Err(e) = locker::connect(&url) {
                prop_assert!(!e.to_string().contains("hunter2"), "{}", e);
            }
        }
    }
}
