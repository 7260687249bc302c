//! The control API on `run/berth.sock`: versioned HTTP/JSON over a unix socket, served by the
//! host proxy (the one owner of the lifecycle) to the `berth` CLI, the tray app and `curl
//! --unix-socket`. `model` is the JSON both sides speak; `API.md` beside the crate describes
//! every endpoint.

pub mod client;
pub mod model;
pub mod server;
