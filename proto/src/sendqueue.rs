//! A control connection's bounded send queue, and what happens when its peer
//! reads slower than we write.
//!
//! - Gossip never piles up: a [`ControlMsg::Gossip`] pushed while another is
//!   still queued is merged into it (per peer, the newer entry wins), so a slow
//!   peer gets one up-to-date view instead of every intermediate one.
//! - [`ControlMsg::Goodbye`] always gets through: it has its own slot and is sent
//!   before anything still queued (the connection closes after it anyway).
//! - Anything else beyond [`SendQueue::limit`] messages marks the queue
//!   overflowed: the connection must be closed (the peer reconnects and gets a
//!   full view), never made to buffer without bound.
//!
//! Never does: encoding, I/O, waking the writer (the caller does that).

use std::collections::VecDeque;

use crate::topology::SignedPeerInfo;
use crate::wire::control::ControlMsg;

/// Messages (other than gossip, which merges, and Goodbye) a queue holds by default.
pub const DEFAULT_LIMIT: usize = 256;

/// What [`SendQueue::push`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// Merged into gossip already queued.
    Coalesced,
    /// The queue is full: close the connection.
    Overflow,
    /// A Goodbye is already queued: the message will never be sent.
    Closing,
}

/// What the writer should do next.
#[derive(Clone, Debug, PartialEq)]
pub enum Next {
    Send(ControlMsg),
    /// Send this Goodbye, then close.
    Goodbye(String),
    /// Close at once: the peer does not keep up.
    Overflow,
}

/// See the module docs.
#[derive(Debug)]
pub struct SendQueue {
    msgs: VecDeque<ControlMsg>,
    goodbye: Option<String>,
    overflowed: bool,
    /// A Goodbye or the overflow was handed out: nothing more.
    closed: bool,
    limit: usize,
}

impl Default for SendQueue {
    fn default() -> Self {
        SendQueue::new(DEFAULT_LIMIT)
    }
}

impl SendQueue {
    pub fn new(limit: usize) -> SendQueue {
        SendQueue { msgs: VecDeque::new(), goodbye: None, overflowed: false, closed: false, limit: limit.max(1) }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn len(&self) -> usize {
        self.msgs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.msgs.is_empty() && self.goodbye.is_none() && (!self.overflowed || self.closed)
    }

    pub fn push(&mut self, msg: ControlMsg) -> Pushed {
        if self.closing() {
            return Pushed::Closing;
        }
        match msg {
            ControlMsg::Goodbye(why) => {
                self.goodbye = Some(why);
                Pushed::Queued
            }
            ControlMsg::Gossip(infos) => {
                if let Some(ControlMsg::Gossip(queued)) =
                    self.msgs.iter_mut().find(|m| matches!(m, ControlMsg::Gossip(_)))
                {
                    merge_gossip(queued, infos);
                    Pushed::Coalesced
                } else {
                    self.push_bounded(ControlMsg::Gossip(infos))
                }
            }
            other => self.push_bounded(other),
        }
    }

    fn push_bounded(&mut self, msg: ControlMsg) -> Pushed {
        if self.msgs.len() >= self.limit {
            self.overflowed = true;
            self.msgs.clear();
            Pushed::Overflow
        } else {
            self.msgs.push_back(msg);
            Pushed::Queued
        }
    }

    /// The next thing to do, if any.
    pub fn pop(&mut self) -> Option<Next> {
        if self.closed {
            return None;
        }
        if let Some(why) = self.goodbye.take() {
            self.msgs.clear();
            self.closed = true;
            return Some(Next::Goodbye(why));
        }
        if self.overflowed {
            self.closed = true;
            return Some(Next::Overflow);
        }
        self.msgs.pop_front().map(Next::Send)
    }

    /// True once [`pop`](Self::pop) has reported an overflow or a Goodbye, or
    /// one is waiting.
    pub fn closing(&self) -> bool {
        self.overflowed || self.closed || self.goodbye.is_some()
    }
}

/// Merges `newer` into `queued`: per peer, the entry with the higher version wins
/// (on a tie the newer message's). Entries keep their first position.
fn merge_gossip(queued: &mut Vec<SignedPeerInfo>, newer: Vec<SignedPeerInfo>) {
    for info in newer {
        match queued.iter_mut().find(|q| q.info.name == info.info.name) {
            Some(q) if q.info.version <= info.info.version => *q = info,
            Some(_) => {}
            None => queued.push(info),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PeerName;

    /// An entry with a seal that is never checked here (the queue only orders and
    /// coalesces; verifying is the topology's job).
    fn info(n: u64, version: u64) -> SignedPeerInfo {
        use crate::topology::{PeerInfo, Seal};
        use crate::trust::{Binding, PeerKeys, Signature};
        let name = PeerName(0x0200_0000_0000 | n);
        let info = PeerInfo {
            name,
            nickname: format!("p{n}"),
            uid: n,
            version,
            software: "t".into(),
            mtu: 1376,
            connections: Vec::new(),
        };
        let keys = PeerKeys { static_key: [n as u8; 32], signing_key: [n as u8; 32] };
        let binding = Binding { name, keys, sig: Signature([0; 64]) };
        SignedPeerInfo { info, seal: Seal { binding, sig: Signature([0; 64]) } }
    }

    #[test]
    fn gossip_coalesces_instead_of_piling_up() {
        let mut q = SendQueue::new(4);
        assert_eq!(q.push(ControlMsg::Ipam(vec![1])), Pushed::Queued);
        assert_eq!(q.push(ControlMsg::Gossip(vec![info(1, 1), info(2, 5)])), Pushed::Queued);
        for v in 2..10_000 {
            assert_eq!(q.push(ControlMsg::Gossip(vec![info(1, v), info(2, 3), info(3, v)])), Pushed::Coalesced);
        }
        assert_eq!(q.len(), 2);
        assert_eq!(q.pop(), Some(Next::Send(ControlMsg::Ipam(vec![1]))));
        // One gossip message, the newest entry per peer, older versions not taking over.
        assert_eq!(q.pop(), Some(Next::Send(ControlMsg::Gossip(vec![info(1, 9999), info(2, 5), info(3, 9999)]))));
        assert_eq!(q.pop(), None);
        assert!(q.is_empty());
        // Once the queued gossip is taken, the next one is queued afresh.
        assert_eq!(q.push(ControlMsg::Gossip(vec![info(1, 1)])), Pushed::Queued);
    }

    #[test]
    fn other_messages_overflow_and_goodbye_gets_through() {
        let mut q = SendQueue::new(3);
        for n in 0..3 {
            assert_eq!(q.push(ControlMsg::Ipam(vec![n])), Pushed::Queued);
        }
        assert_eq!(q.push(ControlMsg::Heartbeat), Pushed::Overflow);
        assert!(q.closing());
        assert_eq!(q.push(ControlMsg::Ipam(vec![9])), Pushed::Closing);
        // Goodbye after an overflow is not sent: the overflow already closes.
        assert_eq!(q.push(ControlMsg::Goodbye("x".into())), Pushed::Closing);
        assert_eq!(q.pop(), Some(Next::Overflow));
        assert_eq!(q.pop(), None);

        let mut q = SendQueue::new(3);
        for n in 0..3 {
            q.push(ControlMsg::Ipam(vec![n]));
        }
        assert_eq!(q.push(ControlMsg::Goodbye("replaced".into())), Pushed::Queued);
        assert_eq!(q.push(ControlMsg::Gossip(vec![info(1, 1)])), Pushed::Closing);
        assert_eq!(q.pop(), Some(Next::Goodbye("replaced".into())), "first, ahead of queued messages");
        assert_eq!(q.pop(), None);
        assert_eq!(q.push(ControlMsg::Heartbeat), Pushed::Closing);
    }

    #[test]
    fn a_full_queue_still_coalesces_gossip() {
        let mut q = SendQueue::new(2);
        q.push(ControlMsg::Gossip(vec![info(1, 1)]));
        q.push(ControlMsg::Ipam(vec![0]));
        assert_eq!(q.push(ControlMsg::Gossip(vec![info(1, 2)])), Pushed::Coalesced);
        assert!(!q.closing());
        assert_eq!(q.pop(), Some(Next::Send(ControlMsg::Gossip(vec![info(1, 2)]))));
    }
}
