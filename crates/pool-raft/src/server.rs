//! The server side of both transports: read a request, hand it to the
//! local `Raft`, write its answer.

use openraft::Raft;
use pool_net::{Endpoint, Session, Stream};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::wire::{read_frame, serve, write_frame, RpcRequest};
use crate::TypeConfig;

/// Serves every session peers open to `ep`, until the endpoint is gone.
pub async fn serve_pool(ep: Endpoint, raft: Raft<TypeConfig>) {
    while let Some(session) = ep.accept().await {
        tokio::spawn(serve_session(session, raft.clone()));
    }
}

async fn serve_session(session: Session, raft: Raft<TypeConfig>) {
    tracing::debug!(session = %session.id(), "raft peer session accepted");
    while let Some(stream) = session.accept_stream().await {
        tokio::spawn(serve_stream(stream, raft.clone()));
    }
}

/// One stream, one RPC.
async fn serve_stream(mut stream: Stream, raft: Raft<TypeConfig>) {
    let req: RpcRequest = match read_frame(&mut stream).await {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => {
            tracing::debug!(error = %e, "bad raft request");
            stream.reset(1);
            return;
        }
    };
    let resp = serve(&raft, req).await;
    if write_frame(&mut stream, &resp).await.is_ok() {
        let _ = stream.shutdown().await;
    }
}

/// Serves every TCP connection to `listener`, until the task is aborted.
pub async fn serve_tcp(listener: TcpListener, raft: Raft<TypeConfig>) {
    loop {
        match listener.accept().await {
            Ok((conn, _)) => {
                tokio::spawn(serve_conn(conn, raft.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "raft tcp accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}

/// One connection: RPCs one after another until the client closes it.
async fn serve_conn(mut conn: TcpStream, raft: Raft<TypeConfig>) {
    let _ = conn.set_nodelay(true);
    loop {
        let req: RpcRequest = match read_frame(&mut conn).await {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, "raft tcp connection ends");
                return;
            }
        };
        let resp = serve(&raft, req).await;
        if write_frame(&mut conn, &resp).await.is_err() || conn.flush().await.is_err() {
            return;
        }
    }
}
