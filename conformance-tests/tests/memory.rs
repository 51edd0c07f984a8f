//! The suite checks itself: `MemoryBackend` passes every case.

locker_conformance::conformance_suite!(memory, async { locker_conformance::memory_setup() });

#[test]
fn every_case_is_generated_once() {
    let mut names = locker_conformance::CASE_NAMES.to_vec();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), locker_conformance::CASE_NAMES.len());
    assert!(names.len() >= 30, "{names:?}");
}
