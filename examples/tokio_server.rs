//! A tokio TCP echo server started on the very listener that proved its port free.
//!
//! ```text
//! cargo run --example tokio_server
//! ```
//!
//! [`PortDaddy::acquire_listener`] binds the port while it holds the registry and hands the
//! listener over, so there is no moment between "the port is free" and "the server listens"
//! in which another program could take it. Any server that accepts a `std` listener works
//! the same way: `tokio::net::TcpListener::from_std`, `axum::serve`, `hyper`, `actix`'s
//! `listen`, `tonic`'s `serve_with_incoming`.

use portdaddy::PortDaddy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A temporary registry keeps the example from leaving anything behind; a real program
    // uses the default one (`PortDaddy::open_default()`).
    let dir = tempfile::tempdir()?;
    let registry = PortDaddy::open(dir.path().join("registry.sqlite3"))?;

    let (guard, listener) = registry.acquire_listener("echo")?;
    // tokio needs a non-blocking socket.
    listener.set_nonblocking(true)?;
    let listener = TcpListener::from_std(listener)?;
    let server: tokio::task::JoinHandle<std::io::Result<()>> = tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await?;
            tokio::spawn(async move {
                let (mut reader, mut writer) = socket.split();
                tokio::io::copy(&mut reader, &mut writer).await
            });
        }
    });

    let mut client = TcpStream::connect(("127.0.0.1", guard.port())).await?;
    client.write_all(b"hello over a handed-over port").await?;
    client.shutdown().await?;
    let mut reply = String::new();
    client.read_to_string(&mut reply).await?;
    assert_eq!(reply, "hello over a handed-over port");
    println!("echo server on port {} answered: {reply}", guard.port());

    server.abort();
    // The lease ends with the guard, after the server has stopped.
    drop(guard);
    assert!(registry.list()?.is_empty());
    Ok(())
}
