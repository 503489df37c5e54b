//! `--capture FILE`: the socket messages of every dump written to FILE in
//! the format `ss` writes with `-D FILE` and reads from the file named by
//! `TCPDIAG_FILE`: the netlink messages of a `sock_diag` dump as the kernel
//! sent them, each header and payload padded to 4 bytes, ended by
//! `NLMSG_DONE`. The inetdiagers append each datagram's socket messages,
//! byte for byte as received; the run writes one `NLMSG_DONE` at exit (`ss`
//! stops reading at the first `NLMSG_DONE`, so the families' own are left
//! out: `ss` then reads both families). `--replay` reads it back
//! (`pipeline/replay.rs`).

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::wire::message::{
    messages, put_header, NLMSG_DONE, NLMSG_HDRLEN, SOCK_DIAG_BY_FAMILY, TCPDIAG_GETSOCK,
};

/// `--capture`: the file the inetdiagers append socket messages to.
pub struct Capture {
    file: Mutex<BufWriter<File>>,
}

impl Capture {
    pub fn create(path: &Path) -> io::Result<Arc<Capture>> {
        let file = File::create(path)?;
        Ok(Arc::new(Capture {
            file: Mutex::new(BufWriter::new(file)),
        }))
    }

    /// Appends the socket messages of one received datagram, byte for byte
    /// as received (a last message without its padding gets it).
    pub fn datagram(&self, datagram: &[u8]) -> io::Result<()> {
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        for msg in messages(datagram) {
            // The netlinker framed the datagram already.
            let Ok(msg) = msg else { break };
            if matches!(msg.msg_type, SOCK_DIAG_BY_FAMILY | TCPDIAG_GETSOCK) {
                // The payload lies in `datagram`, right after its header.
                let start =
                    msg.payload.as_ptr() as usize - datagram.as_ptr() as usize - NLMSG_HDRLEN;
                let len = NLMSG_HDRLEN + msg.payload.len();
                let padded = len.next_multiple_of(4);
                let end = (start + padded).min(datagram.len());
                file.write_all(&datagram[start..end])?;
                file.write_all(&[0; 3][..start + padded - end])?;
            }
        }
        Ok(())
    }

    /// Ends the file with `NLMSG_DONE` and writes it out.
    pub fn finish(&self) -> io::Result<()> {
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let mut header = [0u8; NLMSG_HDRLEN];
        put_header(&mut header, NLMSG_HDRLEN as u32 + 4, NLMSG_DONE, 0, 0);
        file.write_all(&header)?;
        // The kernel's int payload: 0, no error.
        file.write_all(&[0; 4])?;
        file.flush()
    }
}
