//! Admission: who may stay connected to a node, who is kept out for a while, and when an
//! invite this site accepted is asked to complete again. Sans-IO in the engine's manner
//! (quinn-proto's split): the caller feeds what happened with the time (`now`, in ms) and
//! takes back [`Action`]s to carry out; nothing here owns a socket or a timer. The node
//! translates the actions to libp2p, the simulator to its virtual network, so both run
//! this same policy.
//!
//! The rules:
//! - every connection must pass the hello (prove it is a trusted site's node) within
//!   [`AdmissionConfig::hello_deadline_ms`], or it is closed;
//! - connections from one remote address, and connections still before their hello, are
//!   bounded: past either bound a new connection is closed at once;
//! - a peer refused at hello is blocked for [`AdmissionConfig::block_ms`], unless its
//!   certificate was genuine and only its site is not trusted (yet): then its connections
//!   are closed but it is not kept out, since a block would also keep out the connection
//!   on which it completes an invite of this site's;
//! - when this site grants trust to a site (an invite accepted or completed), every peer
//!   refused or blocked as that site's node is let in again and dialed at once, so trust
//!   that arrives after a refusal takes effect now, not when a block runs out;
//! - an accepted invite is asked to complete on every connection to the inviting site,
//!   and again every [`AdmissionConfig::retry_ms`]; a definite refusal stops it for good
//!   and is persisted.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::identity::SiteId;

/// The bounds and timings of admission.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdmissionConfig {
    /// A connection that has not passed the hello this long after it opened is closed.
    pub hello_deadline_ms: u64,
    /// Connections open at once from one remote IP address.
    pub connections_per_address_max: usize,
    /// Connections open at once that have not passed the hello yet.
    pub pending_max: usize,
    /// How long a peer refused at hello is kept out.
    pub block_ms: u64,
    /// How often an unfinished invite completion is asked again.
    pub retry_ms: u64,
    /// Peers remembered with the site their genuine certificate named, for
    /// [`Admission::trust_granted`]; past it the oldest remembered is forgotten.
    pub claimed_max: usize,
}

impl Default for AdmissionConfig {
    fn default() -> AdmissionConfig {
        AdmissionConfig {
            hello_deadline_ms: 5_000,
            connections_per_address_max: 16,
            pending_max: 64,
            block_ms: 60_000,
            retry_ms: 5_000,
            claimed_max: 4_096,
        }
    }
}

/// Why admission closes a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CloseReason {
    /// It did not pass the hello in time.
    HelloDeadline,
    /// Too many connections from its address.
    AddressFull,
    /// Too many connections waiting for their hello.
    PendingFull,
    /// Its hello was refused: its site is not trusted (yet), or it was blocked.
    Refused,
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CloseReason::HelloDeadline => "no hello from a trusted site's node in time",
            CloseReason::AddressFull => "too many connections from its address",
            CloseReason::PendingFull => "too many connections waiting for their hello",
            CloseReason::Refused => "its hello was refused",
        })
    }
}

/// What the caller carries out. `C` names a connection, `P` a peer (a node key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action<C, P> {
    /// Close this connection.
    Close { conn: C, reason: CloseReason },
    /// Keep this peer out (deny and drop its connections) until `until_ms`.
    Block { peer: P, until_ms: u64 },
    /// Let this peer connect again.
    Unblock { peer: P },
    /// Dial this peer now: this site has just come to trust its site.
    Dial { peer: P },
    /// Ask the inviting site to complete the invite this site accepted, on this
    /// connection (which reaches one of the inviter's nodes).
    SendAccept { conn: C, inviter: SiteId },
    /// Dial the invite's addresses to complete it: nothing reaches the inviter now.
    DialInviter { inviter: SiteId },
    /// The inviter refused the completion for good: record it (`trust list` shows the
    /// partner as refused) and stop asking.
    PersistRefused { inviter: SiteId, why: String },
}

/// What the inviter answered to a completion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AcceptAnswer {
    /// The inviter signed its grant back: the invite is complete.
    Completed,
    /// The inviter will never complete it (the invite was used elsewhere, expired, or
    /// was never this site's).
    Refused(String),
    /// No answer (the connection dropped, a timeout): ask again later.
    Failed,
}

struct Connection<P> {
    peer: P,
    ip: IpAddr,
    opened_ms: u64,
    admitted: bool,
}

struct Pending<C> {
    /// When to ask again (dial or send) at the latest.
    next_ms: u64,
    /// A completion request on its way, on this connection.
    in_flight: Option<C>,
}

/// The admission state of one node.
pub struct Admission<C, P> {
    config: AdmissionConfig,
    connections: BTreeMap<C, Connection<P>>,
    per_address: BTreeMap<IpAddr, usize>,
    n_pending: usize,
    blocked: BTreeMap<P, u64>,
    /// Connections by hello deadline, for timeouts.
    deadlines: BTreeMap<(u64, u64), C>,
    deadline_seq: u64,
    /// Invites this site accepted whose completion is not confirmed.
    invites: BTreeMap<SiteId, Pending<C>>,
    /// Which site each admitted peer's node belongs to.
    site_of: BTreeMap<P, SiteId>,
    /// The site each peer's genuine certificate named (admitted or not), with a sequence
    /// number to forget the oldest past `claimed_max`.
    claimed: BTreeMap<P, (SiteId, u64)>,
    claimed_seq: u64,
    actions: std::collections::VecDeque<Action<C, P>>,
    closed_by_reason: BTreeMap<CloseReason, u64>,
}

impl<C: Copy + Ord, P: Copy + Ord> Admission<C, P> {
    pub fn new(config: AdmissionConfig) -> Admission<C, P> {
        Admission {
            config,
            connections: BTreeMap::new(),
            per_address: BTreeMap::new(),
            n_pending: 0,
            blocked: BTreeMap::new(),
            deadlines: BTreeMap::new(),
            deadline_seq: 0,
            invites: BTreeMap::new(),
            site_of: BTreeMap::new(),
            claimed: BTreeMap::new(),
            claimed_seq: 0,
            actions: Default::default(),
            closed_by_reason: BTreeMap::new(),
        }
    }

    pub fn config(&self) -> &AdmissionConfig {
        &self.config
    }

    /// A connection opened (either way). Closed at once past a bound, else it must
    /// pass the hello before its deadline.
    pub fn connection_opened(&mut self, now: u64, conn: C, peer: P, ip: IpAddr) {
        if let Some(until) = self.blocked.get(&peer).copied() {
            if until > now {
                self.close(conn, CloseReason::Refused);
                return;
            }
        }
        let n_from_ip = self.per_address.get(&ip).copied().unwrap_or(0);
        if n_from_ip >= self.config.connections_per_address_max {
            self.close(conn, CloseReason::AddressFull);
            return;
        }
        if self.n_pending >= self.config.pending_max {
            self.close(conn, CloseReason::PendingFull);
            return;
        }
        *self.per_address.entry(ip).or_default() += 1;
        self.n_pending += 1;
        self.deadline_seq += 1;
        self.deadlines.insert(
            (now + self.config.hello_deadline_ms, self.deadline_seq),
            conn,
        );
        self.connections.insert(
            conn,
            Connection {
                peer,
                ip,
                opened_ms: now,
                admitted: false,
            },
        );
    }

    /// The peer passed the hello: a node of `site`, which this site trusts. Every
    /// connection it has is admitted; an invite of that site waiting to complete is
    /// asked on it now.
    pub fn hello_passed(&mut self, now: u64, peer: P, site: SiteId) {
        self.site_of.insert(peer, site);
        let mut first = None;
        for (conn, c) in self.connections.iter_mut().filter(|(_, c)| c.peer == peer) {
            if !c.admitted {
                c.admitted = true;
                self.n_pending -= 1;
            }
            first.get_or_insert(*conn);
        }
        if let Some(conn) = first {
            self.ask_on(now, site, conn);
        }
    }

    /// What the peer's hello presented: a certificate that `Some(site)` really signed
    /// (trusted or not), or `None` for one whose signature fails. Call at every hello,
    /// before `hello_passed` or `hello_refused`: a peer that once showed a genuine
    /// certificate and now a forged one is treated as the forger it is now.
    pub fn hello_presented(&mut self, peer: P, site: Option<SiteId>) {
        let Some(site) = site else {
            self.claimed.remove(&peer);
            return;
        };
        self.claimed_seq += 1;
        self.claimed.insert(peer, (site, self.claimed_seq));
        if self.claimed.len() > self.config.claimed_max {
            let oldest = self
                .claimed
                .iter()
                .min_by_key(|(_, (_, seq))| *seq)
                .map(|(p, _)| *p);
            if let Some(oldest) = oldest {
                self.claimed.remove(&oldest);
            }
        }
        assert!(self.claimed.len() <= self.config.claimed_max);
    }

    /// The peer failed the hello. A genuine node of a site this site does not trust
    /// (yet) has its connections closed; any other is kept out for `block_ms` (its
    /// connections dropped by the caller on [`Action::Block`]).
    pub fn hello_refused(&mut self, now: u64, peer: P) {
        if self.claimed.contains_key(&peer) {
            let conns: Vec<C> = self
                .connections
                .iter()
                .filter(|(_, c)| c.peer == peer)
                .map(|(conn, _)| *conn)
                .collect();
            for conn in conns {
                self.close(conn, CloseReason::Refused);
            }
            return;
        }
        let until_ms = now + self.config.block_ms;
        self.blocked.insert(peer, until_ms);
        self.actions.push_back(Action::Block { peer, until_ms });
    }

    /// This site now trusts `site` (it accepted that site's invite, or that site
    /// completed one of this site's): every peer refused or blocked as that site's node
    /// is let in and dialed at once.
    pub fn trust_granted(&mut self, now: u64, site: SiteId) {
        let peers: Vec<P> = self
            .claimed
            .iter()
            .filter(|(_, (s, _))| *s == site)
            .map(|(p, _)| *p)
            .collect();
        for peer in peers {
            if self.blocked.remove(&peer).is_some_and(|until| until > now) {
                self.actions.push_back(Action::Unblock { peer });
            }
            let connected = self
                .connections
                .values()
                .any(|c| c.peer == peer && c.admitted);
            if !connected {
                self.actions.push_back(Action::Dial { peer });
            }
        }
    }

    pub fn is_blocked(&self, peer: &P, now: u64) -> bool {
        self.blocked.get(peer).is_some_and(|until| *until > now)
    }

    /// Whether the connection passed the hello.
    pub fn is_admitted(&self, conn: &C) -> bool {
        self.connections.get(conn).is_some_and(|c| c.admitted)
    }

    pub fn connection_closed(&mut self, conn: C) {
        let Some(c) = self.connections.remove(&conn) else {
            return;
        };
        if !c.admitted {
            self.n_pending -= 1;
        }
        if let Some(n) = self.per_address.get_mut(&c.ip) {
            *n -= 1;
            if *n == 0 {
                self.per_address.remove(&c.ip);
            }
        }
        self.deadlines.retain(|_, v| *v != conn);
        let _ = c.opened_ms;
        for pending in self.invites.values_mut() {
            if pending.in_flight == Some(conn) {
                pending.in_flight = None;
            }
        }
    }

    /// An invite this site accepted now waits for the inviter's confirmation.
    /// Known already, nothing changes.
    pub fn invite_accepted(&mut self, now: u64, inviter: SiteId) {
        if self.invites.contains_key(&inviter) {
            return;
        }
        self.invites.entry(inviter).or_insert(Pending {
            next_ms: now,
            in_flight: None,
        });
        self.ask_or_dial(now, inviter);
    }

    /// A connection dialed to an invite's address opened: the inviter's node cannot
    /// pass our hello yet (this site holds no grant from it), so the completion goes on
    /// this connection before any hello.
    pub fn inviter_reached(&mut self, now: u64, inviter: SiteId, conn: C) {
        if self.invites.contains_key(&inviter) {
            self.ask_on(now, inviter, conn);
        }
    }

    /// What the inviter answered.
    pub fn accept_answered(&mut self, now: u64, inviter: SiteId, answer: AcceptAnswer) {
        match answer {
            AcceptAnswer::Completed => {
                self.invites.remove(&inviter);
            }
            AcceptAnswer::Refused(why) => {
                if self.invites.remove(&inviter).is_some() {
                    self.actions
                        .push_back(Action::PersistRefused { inviter, why });
                }
            }
            AcceptAnswer::Failed => {
                if let Some(p) = self.invites.get_mut(&inviter) {
                    p.in_flight = None;
                    p.next_ms = now + self.config.retry_ms;
                }
            }
        }
    }

    /// Invites waiting for their inviter's confirmation.
    pub fn invites_pending(&self) -> impl Iterator<Item = &SiteId> {
        self.invites.keys()
    }

    /// The next time `handle_timeout` has something to do.
    pub fn poll_timeout(&self) -> Option<u64> {
        let deadline = self.deadlines.keys().next().map(|(at, _)| *at);
        let unblock = self.blocked.values().min().copied();
        let retry = self
            .invites
            .values()
            .filter(|p| p.in_flight.is_none())
            .map(|p| p.next_ms)
            .min();
        [deadline, unblock, retry].into_iter().flatten().min()
    }

    pub fn handle_timeout(&mut self, now: u64) {
        while let Some(entry) = self.deadlines.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let conn = entry.remove();
            if self.connections.get(&conn).is_some_and(|c| !c.admitted) {
                self.close(conn, CloseReason::HelloDeadline);
            }
        }
        let lifted: Vec<P> = self
            .blocked
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(p, _)| *p)
            .collect();
        for peer in lifted {
            self.blocked.remove(&peer);
            self.actions.push_back(Action::Unblock { peer });
        }
        let due: Vec<SiteId> = self
            .invites
            .iter()
            .filter(|(_, p)| p.in_flight.is_none() && p.next_ms <= now)
            .map(|(s, _)| *s)
            .collect();
        for inviter in due {
            self.ask_or_dial(now, inviter);
        }
    }

    pub fn poll_action(&mut self) -> Option<Action<C, P>> {
        self.actions.pop_front()
    }

    /// Connections closed by admission, by reason, since the start.
    pub fn closed(&self, reason: CloseReason) -> u64 {
        self.closed_by_reason.get(&reason).copied().unwrap_or(0)
    }

    /// Connections open now, and of them those not past their hello.
    pub fn n_connections(&self) -> (usize, usize) {
        (self.connections.len(), self.n_pending)
    }

    /// Asks the inviting site to complete on an admitted connection to it, or dials it
    /// when there is none.
    fn ask_or_dial(&mut self, now: u64, inviter: SiteId) {
        let conn = self
            .connections
            .iter()
            .find(|(_, c)| c.admitted && self.site_of.get(&c.peer) == Some(&inviter))
            .map(|(conn, _)| *conn);
        match conn {
            Some(conn) => self.ask_on(now, inviter, conn),
            None => self.dial_inviter(now, inviter),
        }
    }

    fn ask_on(&mut self, now: u64, inviter: SiteId, conn: C) {
        let Some(p) = self.invites.get_mut(&inviter) else {
            return;
        };
        if p.in_flight.is_some() {
            return;
        }
        p.in_flight = Some(conn);
        p.next_ms = now + self.config.retry_ms;
        self.actions.push_back(Action::SendAccept { conn, inviter });
    }

    fn dial_inviter(&mut self, now: u64, inviter: SiteId) {
        if let Some(p) = self.invites.get_mut(&inviter) {
            p.next_ms = now + self.config.retry_ms;
            self.actions.push_back(Action::DialInviter { inviter });
        }
    }

    fn close(&mut self, conn: C, reason: CloseReason) {
        *self.closed_by_reason.entry(reason).or_default() += 1;
        self.actions.push_back(Action::Close { conn, reason });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type A = Admission<u32, u8>;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    fn actions(a: &mut A) -> Vec<Action<u32, u8>> {
        std::iter::from_fn(|| a.poll_action()).collect()
    }

    #[test]
    fn a_connection_without_a_hello_is_closed_at_its_deadline() {
        let mut a = A::new(AdmissionConfig::default());
        a.connection_opened(0, 1, 9, ip(1));
        a.connection_opened(0, 2, 8, ip(1));
        a.hello_passed(100, 8, SiteId([1; 32]));
        assert_eq!(a.poll_timeout(), Some(5_000));
        a.handle_timeout(4_999);
        assert!(actions(&mut a).is_empty());
        a.handle_timeout(5_000);
        assert_eq!(
            actions(&mut a),
            vec![Action::Close {
                conn: 1,
                reason: CloseReason::HelloDeadline
            }]
        );
        assert!(a.is_admitted(&2));
    }

    #[test]
    fn connections_per_address_and_pending_are_bounded() {
        let config = AdmissionConfig {
            connections_per_address_max: 2,
            pending_max: 3,
            ..AdmissionConfig::default()
        };
        let mut a = A::new(config);
        for conn in 0..3 {
            a.connection_opened(0, conn, conn as u8, ip(1));
        }
        assert_eq!(
            actions(&mut a),
            vec![Action::Close {
                conn: 2,
                reason: CloseReason::AddressFull
            }]
        );
        a.connection_opened(0, 3, 3, ip(2));
        a.connection_opened(0, 4, 4, ip(3));
        assert_eq!(
            actions(&mut a),
            vec![Action::Close {
                conn: 4,
                reason: CloseReason::PendingFull
            }]
        );
        // A closed connection frees its place.
        a.connection_closed(0);
        a.connection_opened(0, 5, 5, ip(1));
        assert!(actions(&mut a).is_empty());
        assert_eq!(a.n_connections(), (3, 3));
    }

    #[test]
    fn a_refused_peer_is_blocked_then_let_in_again() {
        let mut a = A::new(AdmissionConfig::default());
        a.hello_refused(10, 7);
        assert_eq!(
            actions(&mut a),
            vec![Action::Block {
                peer: 7,
                until_ms: 60_010
            }]
        );
        a.connection_opened(20, 1, 7, ip(1));
        assert!(matches!(
            actions(&mut a)[..],
            [Action::Close { conn: 1, .. }]
        ));
        a.handle_timeout(60_010);
        assert_eq!(actions(&mut a), vec![Action::Unblock { peer: 7 }]);
        assert!(!a.is_blocked(&7, 60_010));
    }

    #[test]
    fn an_invite_completes_over_any_connection_to_the_inviter() {
        let inviter = SiteId([3; 32]);
        let mut a = A::new(AdmissionConfig::default());
        // No connection to the inviter: dial its invite's addresses.
        a.invite_accepted(0, inviter);
        assert_eq!(actions(&mut a), vec![Action::DialInviter { inviter }]);
        // A node of the inviter's site connects on its own and passes the hello.
        a.connection_opened(100, 1, 5, ip(1));
        a.hello_passed(100, 5, inviter);
        assert_eq!(
            actions(&mut a),
            vec![Action::SendAccept { conn: 1, inviter }]
        );
        a.accept_answered(200, inviter, AcceptAnswer::Completed);
        a.handle_timeout(100_000);
        assert!(actions(&mut a).is_empty());
        assert_eq!(a.invites_pending().count(), 0);
    }

    #[test]
    fn a_refused_invite_is_persisted_once_and_never_asked_again() {
        let inviter = SiteId([3; 32]);
        let mut a = A::new(AdmissionConfig::default());
        a.connection_opened(0, 1, 5, ip(1));
        a.invite_accepted(0, inviter);
        a.inviter_reached(0, inviter, 1);
        assert_eq!(
            actions(&mut a),
            vec![
                Action::DialInviter { inviter },
                Action::SendAccept { conn: 1, inviter }
            ]
        );
        a.accept_answered(10, inviter, AcceptAnswer::Refused("used".into()));
        assert_eq!(
            actions(&mut a),
            vec![Action::PersistRefused {
                inviter,
                why: "used".into()
            }]
        );
        for t in 1..100 {
            a.handle_timeout(t * 5_000);
        }
        // The connection's hello deadline closes it; nothing is asked again.
        assert!(actions(&mut a)
            .iter()
            .all(|x| matches!(x, Action::Close { .. })));
    }

    #[test]
    fn an_unanswered_completion_is_asked_again_after_the_retry_interval() {
        let inviter = SiteId([3; 32]);
        let mut a = A::new(AdmissionConfig::default());
        a.invite_accepted(0, inviter);
        actions(&mut a);
        a.accept_answered(1_000, inviter, AcceptAnswer::Failed);
        assert_eq!(a.poll_timeout(), Some(6_000));
        a.handle_timeout(6_000);
        assert_eq!(actions(&mut a), vec![Action::DialInviter { inviter }]);
    }

    #[test]
    fn a_peer_refused_before_its_site_was_trusted_is_let_in_and_dialed_when_trust_arrives() {
        let site_d = SiteId([4; 32]);
        let mut a = A::new(AdmissionConfig::default());
        // D's node dials C before D has accepted C's invite: C does not trust D yet.
        a.connection_opened(0, 1, 7, ip(1));
        a.hello_presented(7, Some(site_d));
        a.hello_refused(10, 7);
        assert_eq!(
            actions(&mut a),
            vec![Action::Close {
                conn: 1,
                reason: CloseReason::Refused
            }]
        );
        a.connection_closed(1);
        // Not kept out: its next connection (the invite completion) may open.
        assert!(!a.is_blocked(&7, 20));
        a.connection_opened(20, 2, 7, ip(1));
        assert!(actions(&mut a).is_empty());
        a.connection_closed(2);
        // Trust arrives: D's node is dialed at once, not after a block runs out.
        a.trust_granted(30, SiteId([5; 32]));
        assert!(actions(&mut a).is_empty());
        a.trust_granted(30, site_d);
        assert_eq!(actions(&mut a), vec![Action::Dial { peer: 7 }]);
    }

    #[test]
    fn a_peer_without_a_genuine_certificate_is_still_blocked() {
        let mut a = A::new(AdmissionConfig::default());
        a.connection_opened(0, 1, 7, ip(1));
        a.hello_refused(10, 7);
        assert_eq!(
            actions(&mut a),
            vec![Action::Block {
                peer: 7,
                until_ms: 60_010
            }]
        );
        a.trust_granted(20, SiteId([4; 32]));
        assert!(actions(&mut a).is_empty());
        assert!(a.is_blocked(&7, 20));
    }

    #[test]
    fn a_peer_that_showed_a_genuine_certificate_and_then_a_forged_one_is_blocked() {
        let mut a = A::new(AdmissionConfig::default());
        a.connection_opened(0, 1, 7, ip(1));
        a.hello_presented(7, Some(SiteId([4; 32])));
        a.hello_refused(10, 7);
        actions(&mut a);
        a.connection_closed(1);
        a.connection_opened(20, 2, 7, ip(1));
        a.hello_presented(7, None);
        a.hello_refused(30, 7);
        assert_eq!(
            actions(&mut a),
            vec![Action::Block {
                peer: 7,
                until_ms: 60_030
            }]
        );
    }

    #[test]
    fn claimed_sites_are_bounded() {
        let config = AdmissionConfig {
            claimed_max: 2,
            ..AdmissionConfig::default()
        };
        let mut a = A::new(config);
        for peer in 0..3 {
            a.hello_presented(peer, Some(SiteId([9; 32])));
        }
        a.trust_granted(0, SiteId([9; 32]));
        // The oldest (peer 0) was forgotten.
        assert_eq!(
            actions(&mut a),
            vec![Action::Dial { peer: 1 }, Action::Dial { peer: 2 }]
        );
    }
}
