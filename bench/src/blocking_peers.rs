//! Blocking peers, shaped like the floor's client and server: one thread,
//! `sendmsg`/`recvmsg`, no runtime, no epoll. Measured with them, the switchboard
//! differs from the floor only in the broker. Measured with the async library's
//! peers, the figure also carries their event loops' cost; `connect` reports both.
//! Both peers are the library's own [`flower_proto::blocking`] client and server.

use std::path::Path;

use anyhow::Result;
use flower_proto::Labels;
use flower_proto::blocking::Switchboard;

use crate::procs::PATIENCE;

/// A client that repeats one `ClientConnect`.
pub struct Client {
    switchboard: Switchboard,
    labels: Labels,
}

impl Client {
    pub fn new(path: &Path, labels: &Labels) -> Result<Client> {
        let switchboard = Switchboard::connect(path)?;
        switchboard.set_timeout(Some(PATIENCE))?;
        Ok(Client {
            switchboard,
            labels: labels.clone(),
        })
    }

    /// One connect: the connection arrives and is closed at once.
    pub fn connect_once(&mut self) -> Result<()> {
        drop(self.switchboard.client_connect(&self.labels)?);
        Ok(())
    }
}

/// `flower-bench blocking-server`: registers under `labels`, then takes every
/// connection and closes it, forever.
pub fn server_main(path: &Path, labels: &Labels) -> Result<()> {
    let mut server = Switchboard::connect(path)?.server_start(labels)?;
    println!("ready");
    loop {
        drop(server.accept()?);
    }
}
