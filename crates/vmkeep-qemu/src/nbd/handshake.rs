//! The NBD fixed-newstyle handshake: options (structured replies, meta contexts) and
//! NBD_OPT_GO, with every option reply bounded and validated.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::debug;

use super::proto::{self, BlockSize};
use crate::error::{Error, Result};

/// What the handshake established.
#[derive(Debug, Clone)]
pub(super) struct Negotiated {
    pub(super) size: u64,
    pub(super) flags: u16,
    pub(super) block_size: Option<BlockSize>,
    pub(super) contexts: Vec<(u32, String)>,
}

pub(super) async fn handshake<S>(s: &mut S, export: &str, contexts: &[&str]) -> Result<Negotiated>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut g = [0u8; 18];
    s.read_exact(&mut g)
        .await
        .map_err(|e| Error::io("read NBD greeting", e))?;
    let hflags = proto::parse_greeting(&g)?;
    let mut cflags = proto::CLIENT_FIXED_NEWSTYLE;
    if hflags & proto::FLAG_NO_ZEROES != 0 {
        cflags |= proto::CLIENT_NO_ZEROES;
    }
    write(s, &cflags.to_be_bytes()).await?;

    // Structured replies.
    write(s, &proto::encode_option(proto::OPT_STRUCTURED_REPLY, &[])).await?;
    let (h, payload) = read_option_reply(s, proto::OPT_STRUCTURED_REPLY).await?;
    match h.reply_type {
        proto::REP_ACK => {}
        t if t & proto::REP_FLAG_ERROR != 0 => {
            return Err(Error::NbdUnsupported(format!(
                "structured replies ({}: {})",
                proto::reply_type_name(t),
                proto::parse_option_error(&payload)
            )))
        }
        t => return Err(unexpected_reply(proto::OPT_STRUCTURED_REPLY, t)),
    }

    // Meta contexts.
    let mut granted: Vec<(u32, String)> = Vec::new();
    if !contexts.is_empty() {
        let req = proto::encode_meta_context_request(export, contexts);
        write(s, &proto::encode_option(proto::OPT_SET_META_CONTEXT, &req)).await?;
        loop {
            let (h, payload) = read_option_reply(s, proto::OPT_SET_META_CONTEXT).await?;
            match h.reply_type {
                proto::REP_META_CONTEXT => {
                    let (id, name) = proto::parse_meta_context(&payload)?;
                    if !contexts.contains(&name.as_str()) {
                        return Err(Error::nbd(
                            "NBD_REP_META_CONTEXT",
                            format!("server granted context {name:?} that was not requested"),
                        ));
                    }
                    if granted.iter().any(|(i, n)| *i == id || *n == name) {
                        return Err(Error::nbd(
                            "NBD_REP_META_CONTEXT",
                            format!("context {name:?} (id {id}) granted twice"),
                        ));
                    }
                    granted.push((id, name));
                }
                proto::REP_ACK => break,
                t if t & proto::REP_FLAG_ERROR != 0 => {
                    return Err(rejected(proto::OPT_SET_META_CONTEXT, t, &payload))
                }
                t => return Err(unexpected_reply(proto::OPT_SET_META_CONTEXT, t)),
            }
        }
        if let Some(missing) = contexts
            .iter()
            .find(|c| !granted.iter().any(|(_, n)| n == *c))
        {
            return Err(Error::NbdContextUnavailable((*missing).to_owned()));
        }
    }

    // Open the export.
    write(
        s,
        &proto::encode_option(proto::OPT_GO, &proto::encode_go_request(export)),
    )
    .await?;
    let mut export_info = None;
    let mut block_size = None;
    for _ in 0..64 {
        let (h, payload) = read_option_reply(s, proto::OPT_GO).await?;
        match h.reply_type {
            proto::REP_INFO => match proto::parse_info(&payload)? {
                proto::Info::Export { size, flags } => export_info = Some((size, flags)),
                proto::Info::BlockSize(bs) => block_size = Some(bs),
                other => debug!(?other, "NBD info ignored"),
            },
            proto::REP_ACK => {
                let (size, flags) = export_info
                    .ok_or_else(|| Error::nbd("NBD_OPT_GO", "ACK without NBD_INFO_EXPORT"))?;
                return Ok(Negotiated {
                    size,
                    flags,
                    block_size,
                    contexts: granted,
                });
            }
            t if t & proto::REP_FLAG_ERROR != 0 => {
                return Err(rejected(proto::OPT_GO, t, &payload))
            }
            t => return Err(unexpected_reply(proto::OPT_GO, t)),
        }
    }
    Err(Error::nbd("NBD_OPT_GO", "too many replies"))
}

fn rejected(option: u32, t: u32, payload: &[u8]) -> Error {
    Error::NbdOptionRejected {
        option: proto::option_name(option),
        reply: proto::reply_type_name(t),
        message: proto::parse_option_error(payload),
    }
}

fn unexpected_reply(option: u32, t: u32) -> Error {
    Error::nbd(
        "option reply",
        format!(
            "unexpected {} to {}",
            proto::reply_type_name(t),
            proto::option_name(option)
        ),
    )
}

async fn write<S: AsyncWrite + Unpin>(s: &mut S, b: &[u8]) -> Result<()> {
    s.write_all(b)
        .await
        .map_err(|e| Error::io("write NBD handshake", e))?;
    s.flush()
        .await
        .map_err(|e| Error::io("write NBD handshake", e))
}

async fn read_option_reply<S: AsyncRead + Unpin>(
    s: &mut S,
    option: u32,
) -> Result<(proto::OptionReplyHeader, Vec<u8>)> {
    let mut b = [0u8; 20];
    s.read_exact(&mut b)
        .await
        .map_err(|e| Error::io("read NBD option reply", e))?;
    let h = proto::parse_option_reply_header(&b, option)?;
    let mut payload = vec![0u8; h.len as usize];
    s.read_exact(&mut payload)
        .await
        .map_err(|e| Error::io("read NBD option reply", e))?;
    Ok((h, payload))
}
