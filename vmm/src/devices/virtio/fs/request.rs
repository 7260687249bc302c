//! Serving one virtio-fs request: a FUSE message read from a chain's driver-readable buffers,
//! handed to the FUSE server, its reply written into the chain's device-writable buffers.

use std::mem::size_of;
use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::{InHeader, Opcode, OutHeader};
use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use virtio_queue::DescriptorChain;
use vm_memory::ByteValued;

use super::share::ShareFs;
use crate::devices::virtio::event_loop::DeviceHandler;
use crate::memory::GuestMemory;

/// Serves the hiprio and request queues on the device's event loop thread (never a vCPU's):
/// requests are handled one at a time, in the order the driver queued them.
pub(crate) struct FsHandler {
    server: Arc<Server<Arc<ShareFs>>>,
}

impl FsHandler {
    pub(crate) fn new(server: Arc<Server<Arc<ShareFs>>>) -> Self {
        Self { server }
    }
}

impl DeviceHandler for FsHandler {
    fn handle_chain(
        &mut self,
        mem: &GuestMemory,
        _queue_index: usize,
        chain: DescriptorChain<&GuestMemory>,
    ) -> u32 {
        serve(&self.server, mem, chain)
    }
}

/// Serves the request in `chain` and returns the used length: the bytes of the reply. A request
/// the server cannot decode (truncated, bad lengths) gets an EINVAL reply when its header can be
/// read and asks for one; a chain whose buffers are not in guest memory is used empty.
pub fn serve<F: FileSystem + Sync>(
    server: &Server<F>,
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
) -> u32 {
    let reader = match Reader::from_descriptor_chain(mem, chain.clone()) {
        Ok(reader) => reader,
        Err(e) => {
            warn_rate_limited!("virtio-fs: dropping a request whose buffers are unusable: {e}");
            return 0;
        }
    };
    let writer = match VirtioFsWriter::new(mem, chain.clone()) {
        Ok(writer) => writer,
        Err(e) => {
            warn_rate_limited!(
                "virtio-fs: dropping a request whose reply buffers are unusable: {e}"
            );
            return 0;
        }
    };
    match server.handle_message(reader, writer.into(), None, None) {
        Ok(len) => u32::try_from(len).unwrap_or(0),
        Err(e) => {
            warn_rate_limited!("virtio-fs: a malformed request: {e}");
            reply_error(mem, chain, libc::EINVAL)
        }
    }
}

/// Opcodes the driver expects no reply to.
fn wants_reply(opcode: u32) -> bool {
    ![
        Opcode::Forget as u32,
        Opcode::BatchForget as u32,
        Opcode::Interrupt as u32,
    ]
    .contains(&opcode)
}

/// Writes an error reply to the request in `chain` if its header can be read and it wants one;
/// returns the used length.
fn reply_error(mem: &GuestMemory, chain: DescriptorChain<&GuestMemory>, errno: i32) -> u32 {
    let Ok(mut reader) = Reader::from_descriptor_chain(mem, chain.clone()) else {
        return 0;
    };
    let Ok(header) = reader.read_obj::<InHeader>() else {
        return 0;
    };
    if !wants_reply(header.opcode) {
        return 0;
    }
    let out = OutHeader {
        len: size_of::<OutHeader>() as u32,
        error: -errno,
        unique: header.unique,
    };
    let Ok(mut writer) = VirtioFsWriter::new(mem, chain) else {
        return 0;
    };
    match std::io::Write::write_all(&mut writer, out.as_slice()) {
        Ok(()) => out.len,
        Err(_) => 0,
    }
}
