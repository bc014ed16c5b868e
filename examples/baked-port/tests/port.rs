//! The baked-in port is the one the registry holds for this crate.

#[test]
fn the_baked_in_port_is_leased_to_this_crate() {
    let registry = portdaddy::PortDaddy::open_default().expect("open the registry");
    let leases = registry.list().expect("list");
    let lease = leases
        .iter()
        .find(|l| l.name() == "baked-port/dev-server")
        .expect("the build script's lease");
    assert_eq!(lease.port(), baked_port::DEV_SERVER_PORT);
    assert!(lease.is_detached());
    println!("DEV_SERVER_PORT={}", baked_port::DEV_SERVER_PORT);
}
