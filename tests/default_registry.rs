//! The zero-configuration entry point and the registry path it picks.
//!
//! Environment variables are process-wide, so this file holds a single test: under both
//! `cargo test` and `cargo nextest` it then runs alone in its process.

#[test]
fn acquire_uses_portdaddy_db_then_xdg_state_home_then_home() {
    let dir = tempfile::tempdir().unwrap();
    let explicit = dir.path().join("explicit/ports.sqlite3");
    let state = dir.path().join("state");

    std::env::set_var("XDG_STATE_HOME", &state);
    std::env::remove_var(portdaddy::ENV_VAR);
    assert_eq!(
        portdaddy::PortDaddy::default_path(),
        state.join("portdaddy/registry.sqlite3")
    );

    std::env::remove_var("XDG_STATE_HOME");
    std::env::set_var("HOME", dir.path());
    assert_eq!(
        portdaddy::PortDaddy::default_path(),
        dir.path().join(".local/state/portdaddy/registry.sqlite3")
    );

    std::env::set_var(portdaddy::ENV_VAR, &explicit);
    assert_eq!(portdaddy::PortDaddy::default_path(), explicit);

    let guard = portdaddy::acquire("zero-config").unwrap();
    assert!(
        explicit.exists(),
        "the registry is created at $PORTDADDY_DB"
    );
    let listed = portdaddy::PortDaddy::open(&explicit)
        .unwrap()
        .list()
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].port(), listed[0].name()),
        (guard.port(), "zero-config")
    );
    assert_eq!(listed[0].pid(), Some(std::process::id()));
    let range = portdaddy::PortRange::default_for_host();
    assert!(range.contains(guard.port()));
    drop(guard);
    assert!(portdaddy::PortDaddy::open(&explicit)
        .unwrap()
        .list()
        .unwrap()
        .is_empty());
}
