//! Coverage counters: how often a run reached each rare path and each hostile act, so a
//! swarm that never reached one shows it. `swarm` sums them over seeds and prints, for
//! each, the total and how many seeds reached it.

macro_rules! counters {
    ($( $(#[doc = $doc:literal])* $rare:literal $name:ident, )*) => {
        #[derive(Clone, Debug, Default)]
        pub struct Coverage {
            $( $(#[doc = $doc])* pub $name: u64, )*
        }

        impl Coverage {
            /// Every counter: (name, value, whether it is a rare path the swarm must reach).
            pub fn rows(&self) -> Vec<(&'static str, u64, bool)> {
                vec![$( (stringify!($name), self.$name, $rare), )*]
            }

            /// Adds another run's counters; those named `*_max` keep the larger.
            pub fn add(&mut self, other: &Coverage) {
                $(
                    if stringify!($name).ends_with("_max") {
                        self.$name = self.$name.max(other.$name);
                    } else {
                        self.$name += other.$name;
                    }
                )*
            }
        }
    };
}

counters! {
    /// A chunk deleted (trimmed, or dropped for a revoked owner) while a push of it was on
    /// the wire: repair racing a deletion.
    true repair_raced_deletion,
    /// A restore drill's fetch answered while the restoring site was partitioned from
    /// another.
    true restore_during_partition,
    /// An audit failed for a chunk that was being repaired (below R good copies, or a
    /// push of it on the wire).
    true audit_failed_mid_repair,
    /// Audits that failed (wrong, missing or late), those unanswered by a peer that
    /// answered nothing else either (not held against it), and those that named a liar.
    false audits_failed,
    false audits_unreachable,
    false lies_caught,
    /// The longest a lie went before an honest node's audit named the liar, seconds.
    false lie_caught_after_secs_max,
    /// Chunks an engine found unreadable or bad on its own disk and forgot.
    false chunks_lost_noticed,
    /// Chunk bytes flipped on disks by corruption faults.
    false copies_corrupted,
    /// Storage operations undone by lost-writes crashes.
    false storage_ops_lost,
    /// Nodes that came back with an old disk; chunks it brought back that the node had
    /// deleted since, chunks written since that it lacks, and records on it older than
    /// the truth.
    false old_disks,
    false old_disk_chunks_back,
    false old_disk_chunks_gone,
    false old_disk_stale_records,
    /// Partners' chunks a false claimer acknowledged but kept as garbage.
    false false_claims_made,
    /// Chunks a wrong-bytes node sent with a flipped byte.
    false wrong_bytes_sent,
    false forgeries_sent,
    false replays_sent,
    /// Records engines refused (bad signature, untrusted author, not allowed).
    false records_rejected,
    false flood_messages,
    /// Bytes honest nodes sent a flooding node while it flooded.
    false flood_answer_bytes,
    false outsider_attempts,
    false outsider_connects_refused,
    false outsider_messages_refused,
    /// Admission (`world::admit`): hellos refused, peers blocked for a bad hello and
    /// messages of theirs the transport denied, connections closed as they opened (a
    /// bound, a block); the outsider's silent strangers opened, closed at the hello
    /// deadline, and refused past a bound; dials admission asked for when trust arrived.
    false hellos_refused,
    false peers_blocked,
    false admission_blocked_messages,
    false connections_closed_at_open,
    false strangers_connected,
    false strangers_closed_at_deadline,
    false strangers_refused_over_bound,
    false trust_granted_dials,
    /// Hellos of the partner's partner (a site trusted by one scenario site only),
    /// admitted by its one partner's nodes and refused by the others'.
    false partners_partner_admitted,
    false partners_partner_refused,
    /// Messages engines dropped as malformed, forged or against the rules (strikes),
    /// peers they cut off, and holders they left out of placement after failed audits.
    false messages_dropped,
    false peers_cut_off,
    false holders_excluded,
    /// Restore drills run while faults ran, the fetches they made, those that failed
    /// (no reachable holder) and bad copies they routed around.
    false drills,
    false drill_fetches,
    false drill_fetch_failures,
    false bad_copies_routed_around,
    /// Garbage collection: snapshots forgotten, prunes run, statements signed, batches
    /// re-issued by a commit (O3) and restates a node skipped for lack of a batch's ids;
    /// chunks swept at owners and collected at holders; copies of garbage left at
    /// partners at rest.
    false gc_forgotten,
    /// Newest acknowledged snapshots forgotten by hand (`forget_newest_every`).
    false gc_forgot_newest,
    /// Chunks a backup used while the statement in force listed them.
    false gc_dedup_of_listed,
    false gc_prunes,
    /// Prunes left for later because a backup ran on their node.
    false gc_prune_waited_for_backup,
    false gc_statements,
    false gc_revived_batches,
    false gc_restate_skipped,
    /// Batches a prune left out of its statement because its node did not know their ids.
    false gc_batch_dropped_unknown,
    /// Dead ids a prune left for the next one (past `GC_BATCHES_MAX`), and batches
    /// retired from the statement by age.
    false gc_batches_max_deferred,
    false gc_batches_retired,
    /// Statements re-signed by the fallback (a node's digest differed from the basis for
    /// `GC_RESTATE_AFTER_MS`).
    false gc_fallback_resigned,
    /// Prunes and re-signs that stopped because a kept snapshot's chunks were unknown.
    false gc_mark_incomplete,
    false gc_swept,
    false gc_collected,
    false gc_garbage_left_at_partners,
}
