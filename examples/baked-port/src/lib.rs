//! A crate with a port baked in at build time by its build script.

/// The dev server's port, leased by `build.rs` when this crate was built.
pub const DEV_SERVER_PORT: u16 = parse_port(env!("DEV_SERVER_PORT"));

const fn parse_port(digits: &str) -> u16 {
    let bytes = digits.as_bytes();
    let mut value: u32 = 0;
    let mut i = 0;
    while i < bytes.len() {
        assert!(bytes[i].is_ascii_digit(), "DEV_SERVER_PORT is not a number");
        value = value * 10 + (bytes[i] - b'0') as u32;
        assert!(value <= 65535, "DEV_SERVER_PORT is not a port");
        i += 1;
    }
    value as u16
}
