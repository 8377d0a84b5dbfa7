//! The handle registry: what C holds is a number, never an address.
//!
//! Every object handed to C is kept here under a 64-bit id that is never
//! reused; the pointer C receives is that id. A freed, forged or
//! wrong-kind handle is therefore found missing in the table (an error, not
//! undefined behaviour), and no C pointer to a libpool object is ever
//! dereferenced. A call in progress holds its own reference, so freeing an
//! object while another thread uses it is memory-safe too.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use crate::error::{pool_status, Fail, Res};
use crate::objects::{Endpoint, SessionObj, StreamObj, TrustObj};

/// One registered object.
#[derive(Clone)]
pub(crate) enum Obj {
    Endpoint(Arc<Endpoint>),
    Session(Arc<SessionObj>),
    Stream(Arc<StreamObj>),
    Trust(Arc<TrustObj>),
}

impl Obj {
    fn kind(&self) -> &'static str {
        match self {
            Obj::Endpoint(_) => "pool_endpoint",
            Obj::Session(_) => "pool_session",
            Obj::Stream(_) => "pool_stream",
            Obj::Trust(_) => "pool_trust",
        }
    }
}

/// Ids start high and odd-spaced so that small integers and typical heap
/// addresses are never live handles.
const FIRST_ID: u64 = 0x5000_0001;
static NEXT: AtomicU64 = AtomicU64::new(FIRST_ID);

fn table() -> MutexGuard<'static, HashMap<u64, Obj>> {
    static T: OnceLock<Mutex<HashMap<u64, Obj>>> = OnceLock::new();
    T.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// Registers `obj`; returns its handle as the pointer type C sees.
pub(crate) fn insert<T>(obj: Obj) -> *mut T {
    let id = NEXT.fetch_add(2, Ordering::Relaxed);
    table().insert(id, obj);
    std::ptr::without_provenance_mut(id as usize)
}

fn missing(kind: &str, id: u64) -> Fail {
    if id == 0 {
        return Fail::new(
            pool_status::POOL_EINVAL,
            format!("{kind} is NULL: pass the handle a pool_* call returned"),
        );
    }
    Fail::new(
        pool_status::POOL_EBADHANDLE,
        format!(
            "{kind} {id:#x} is not a live handle: it was freed already, or never came from libpool"
        ),
    )
}

fn wrong(kind: &str, got: &Obj) -> Fail {
    Fail::new(
        pool_status::POOL_EBADHANDLE,
        format!("expected a {kind}, got a {}", got.kind()),
    )
}

macro_rules! getter {
    ($get:ident, $take:ident, $variant:ident, $t:ty, $kind:literal) => {
        pub(crate) fn $get<P>(p: *const P) -> Res<Arc<$t>> {
            let id = p.addr() as u64;
            match table().get(&id) {
                Some(Obj::$variant(o)) => Ok(o.clone()),
                Some(other) => Err(wrong($kind, other)),
                None => Err(missing($kind, id)),
            }
        }
        pub(crate) fn $take<P>(p: *const P) -> Res<Arc<$t>> {
            let id = p.addr() as u64;
            let mut t = table();
            match t.get(&id) {
                Some(Obj::$variant(_)) => match t.remove(&id) {
                    Some(Obj::$variant(o)) => Ok(o),
                    _ => Err(missing($kind, id)),
                },
                Some(other) => Err(wrong($kind, other)),
                None => Err(missing($kind, id)),
            }
        }
    };
}

getter!(endpoint, take_endpoint, Endpoint, Endpoint, "pool_endpoint");
getter!(session, take_session, Session, SessionObj, "pool_session");
getter!(stream, take_stream, Stream, StreamObj, "pool_stream");
getter!(trust, take_trust, Trust, TrustObj, "pool_trust");

/// Removes every object (`pool_shutdown`); returns them so they are dropped
/// outside the table's lock.
pub(crate) fn drain() -> Vec<Obj> {
    let mut t = table();
    let all = t.drain().map(|(_, o)| o).collect();
    // Give the table's memory back too (leak checkers look at exit).
    t.shrink_to_fit();
    all
}
