//! Dialing: when to dial a peer the node wants to reach, and when to wait. Sans-IO like
//! [`crate::admission`]: the caller says what it wants and what happened to each dial,
//! with the time, and takes back [`DialAction`]s; it owns the sockets, this owns the
//! policy. The node translates `Dial` to a libp2p dial at the addresses it knows.
//!
//! The rules:
//! - a peer is dialed when it is wanted, not connected, and no dial to it is under way;
//! - a failed dial waits [`DialerConfig::backoff_initial_ms`] before the next, doubling
//!   at each failure in a row up to [`DialerConfig::backoff_max_ms`]; a connection resets
//!   it;
//! - a peer still wanted when its wait ends is dialed again (`handle_timeout`); one no
//!   longer wanted is not;
//! - the peers tracked are bounded: past [`DialerConfig::peers_max`] the one idle longest
//!   is forgotten.

use std::collections::{BTreeMap, VecDeque};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DialerConfig {
    /// The wait after a first failed dial.
    pub backoff_initial_ms: u64,
    /// The longest wait between dials to one peer.
    pub backoff_max_ms: u64,
    /// Peers tracked at once.
    pub peers_max: usize,
}

impl Default for DialerConfig {
    fn default() -> DialerConfig {
        DialerConfig {
            backoff_initial_ms: 5_000,
            backoff_max_ms: 300_000,
            peers_max: 4_096,
        }
    }
}

/// What the caller carries out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DialAction<P> {
    /// Dial this peer now, at every address known for it.
    Dial { peer: P },
}

/// What [`Dialer::want`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// Connected already.
    Connected,
    /// A dial is under way (possibly the one just asked for).
    Dialing,
    /// Its last dials failed: the next is due at this time.
    Waiting { until_ms: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Idle,
    Dialing,
    Connected,
}

#[derive(Clone, Debug)]
struct PeerDial {
    state: State,
    /// Failed dials in a row.
    failures: u32,
    /// No dial before this.
    next_ms: u64,
    /// Still wanted: dial again when the wait ends.
    wanted: bool,
    /// When anything last happened to it, to forget the idlest first.
    touched_ms: u64,
}

pub struct Dialer<P> {
    config: DialerConfig,
    peers: BTreeMap<P, PeerDial>,
    actions: VecDeque<DialAction<P>>,
}

impl<P: Copy + Ord> Dialer<P> {
    pub fn new(config: DialerConfig) -> Dialer<P> {
        Dialer {
            config,
            peers: BTreeMap::new(),
            actions: VecDeque::new(),
        }
    }

    /// The caller wants to reach `peer`: dialed now unless connected, dialing, or
    /// waiting after failures (then dialed when the wait ends, if still wanted).
    pub fn want(&mut self, now: u64, peer: P) -> Reach {
        self.make_room(&peer);
        let entry = self.peers.entry(peer).or_insert(PeerDial {
            state: State::Idle,
            failures: 0,
            next_ms: now,
            wanted: false,
            touched_ms: now,
        });
        entry.touched_ms = now;
        match entry.state {
            State::Connected => Reach::Connected,
            State::Dialing => Reach::Dialing,
            State::Idle if entry.next_ms > now => {
                entry.wanted = true;
                Reach::Waiting {
                    until_ms: entry.next_ms,
                }
            }
            State::Idle => {
                entry.state = State::Dialing;
                entry.wanted = false;
                self.actions.push_back(DialAction::Dial { peer });
                Reach::Dialing
            }
        }
    }

    /// The caller gave up on a peer (nothing is queued for it now).
    pub fn unwant(&mut self, peer: &P) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.wanted = false;
        }
    }

    /// A dial to `peer` failed (or could not start).
    pub fn dial_failed(&mut self, now: u64, peer: P) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        if p.state == State::Connected {
            return; // another connection made it
        }
        p.state = State::Idle;
        p.failures = p.failures.saturating_add(1);
        let shift = (p.failures - 1).min(32);
        let wait = self
            .config
            .backoff_initial_ms
            .saturating_mul(1u64 << shift)
            .min(self.config.backoff_max_ms);
        p.next_ms = now + wait;
        p.touched_ms = now;
    }

    /// A connection to `peer` opened (either way): its backoff is over.
    pub fn connected(&mut self, now: u64, peer: P) {
        self.make_room(&peer);
        let p = self.peers.entry(peer).or_insert(PeerDial {
            state: State::Connected,
            failures: 0,
            next_ms: now,
            wanted: false,
            touched_ms: now,
        });
        p.state = State::Connected;
        p.failures = 0;
        p.next_ms = now;
        p.wanted = false;
        p.touched_ms = now;
    }

    /// The last connection to `peer` closed: it may be dialed again at once.
    pub fn disconnected(&mut self, now: u64, peer: P) {
        if let Some(p) = self.peers.get_mut(&peer) {
            if p.state == State::Connected {
                p.state = State::Idle;
                p.touched_ms = now;
            }
        }
    }

    /// When `handle_timeout` next has a peer to dial.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.peers
            .values()
            .filter(|p| p.wanted && p.state == State::Idle)
            .map(|p| p.next_ms)
            .min()
    }

    /// Dials the wanted peers whose wait is over.
    pub fn handle_timeout(&mut self, now: u64) {
        for (peer, p) in self.peers.iter_mut() {
            if p.wanted && p.state == State::Idle && p.next_ms <= now {
                p.state = State::Dialing;
                p.wanted = false;
                p.touched_ms = now;
                self.actions.push_back(DialAction::Dial { peer: *peer });
            }
        }
    }

    pub fn poll_action(&mut self) -> Option<DialAction<P>> {
        self.actions.pop_front()
    }

    /// Whether a dial to `peer` is under way.
    pub fn is_dialing(&self, peer: &P) -> bool {
        self.peers
            .get(peer)
            .is_some_and(|p| p.state == State::Dialing)
    }

    /// The time the next dial to `peer` may start, if it is waiting after failures.
    pub fn next_dial_ms(&self, peer: &P) -> Option<u64> {
        self.peers
            .get(peer)
            .filter(|p| p.state == State::Idle)
            .map(|p| p.next_ms)
    }

    fn make_room(&mut self, peer: &P) {
        if self.peers.len() < self.config.peers_max || self.peers.contains_key(peer) {
            return;
        }
        let idlest = self
            .peers
            .iter()
            .filter(|(_, p)| p.state != State::Connected)
            .min_by_key(|(_, p)| p.touched_ms)
            .or_else(|| self.peers.iter().min_by_key(|(_, p)| p.touched_ms))
            .map(|(peer, _)| *peer);
        if let Some(idlest) = idlest {
            self.peers.remove(&idlest);
        }
        assert!(self.peers.len() < self.config.peers_max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn actions(d: &mut Dialer<u8>) -> Vec<DialAction<u8>> {
        std::iter::from_fn(|| d.poll_action()).collect()
    }

    #[test]
    fn a_wanted_peer_is_dialed_once_while_the_dial_is_under_way() {
        let mut d = Dialer::new(DialerConfig::default());
        assert_eq!(d.want(0, 1), Reach::Dialing);
        assert_eq!(d.want(10, 1), Reach::Dialing);
        assert_eq!(actions(&mut d), vec![DialAction::Dial { peer: 1 }]);
        d.connected(20, 1);
        assert_eq!(d.want(30, 1), Reach::Connected);
        assert!(actions(&mut d).is_empty());
    }

    #[test]
    fn failed_dials_back_off_doubling_up_to_the_cap() {
        let config = DialerConfig {
            backoff_initial_ms: 1_000,
            backoff_max_ms: 5_000,
            ..DialerConfig::default()
        };
        let mut d = Dialer::new(config);
        let mut now = 0;
        let mut waits = Vec::new();
        for _ in 0..5 {
            d.want(now, 1);
            assert_eq!(actions(&mut d), vec![DialAction::Dial { peer: 1 }]);
            d.dial_failed(now, 1);
            let next = d.next_dial_ms(&1).expect("waiting");
            waits.push(next - now);
            // Wanted again during the wait: not dialed, told until when.
            assert_eq!(d.want(now + 1, 1), Reach::Waiting { until_ms: next });
            assert!(actions(&mut d).is_empty());
            assert_eq!(d.poll_timeout(), Some(next));
            now = next;
            d.handle_timeout(now);
            assert_eq!(actions(&mut d), vec![DialAction::Dial { peer: 1 }]);
            d.dial_failed(now, 1);
            let next = d.next_dial_ms(&1).expect("waiting");
            waits.push(next - now);
            now = next;
        }
        assert_eq!(
            waits,
            vec![1_000, 2_000, 4_000, 5_000, 5_000, 5_000, 5_000, 5_000, 5_000, 5_000]
        );
        // A connection resets it.
        d.connected(now, 1);
        d.disconnected(now + 1, 1);
        assert_eq!(d.want(now + 2, 1), Reach::Dialing);
        d.dial_failed(now + 2, 1);
        assert_eq!(d.next_dial_ms(&1), Some(now + 2 + 1_000));
    }

    #[test]
    fn a_peer_no_longer_wanted_is_not_dialed_when_its_wait_ends() {
        let mut d = Dialer::new(DialerConfig::default());
        d.want(0, 1);
        d.dial_failed(0, 1);
        actions(&mut d);
        d.want(1, 1);
        d.unwant(&1);
        assert_eq!(d.poll_timeout(), None);
        d.handle_timeout(1_000_000);
        assert!(actions(&mut d).is_empty());
    }

    #[test]
    fn tracked_peers_are_bounded() {
        let config = DialerConfig {
            peers_max: 3,
            ..DialerConfig::default()
        };
        let mut d = Dialer::new(config);
        for peer in 0..10u8 {
            d.want(u64::from(peer), peer);
            d.dial_failed(u64::from(peer), peer);
        }
        assert_eq!(d.peers.len(), 3);
        // The newest are kept.
        assert!(d.next_dial_ms(&9).is_some());
        assert!(d.next_dial_ms(&0).is_none());
    }
}
