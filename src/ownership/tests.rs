//! The hand-off planner and routes, scripted: joins, leaves, restarts, lost borrowers.

use super::*;

fn addr(i: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7000 + i))
}

fn ring(members: &[u16]) -> Ring {
    Ring::new(members.iter().map(|i| addr(*i)), 16)
}

/// A table holding every partition `r` gives `me`, at `epoch`, as `h`.
fn owned(me: u16, r: &Ring, epoch: u64, h: Holding) -> Table {
    let mut t = Table::default();
    for p in 0..PARTITIONS {
        if r.partition_owner(p as usize) == Some(addr(me)) {
            t.set(p, Part { epoch, holding: Some(h) });
        }
    }
    t
}

fn report(t: &Table) -> Vec<PeerHolding> {
    t.held().map(|(p, x)| PeerHolding { partition: p, epoch: x.epoch, holding: x.holding.unwrap() }).collect()
}

/// The actions about partition `p` only.
fn about(acts: Vec<Action>, p: u16) -> Vec<Action> {
    acts.into_iter()
        .filter(|a| match *a {
            Action::Pull { p: x, .. } | Action::Adopt { p: x, .. } | Action::Reclaim { p: x, .. } => x == p,
            Action::Discard { p: x } | Action::ForgetLent { p: x } => x == p,
            Action::Promote { p: x, .. } | Action::DropReplica { p: x, .. } | Action::StandDown { p: x } => x == p,
        })
        .collect()
}

fn survey(peers: &[(u16, &Table)]) -> Survey {
    Survey { answered: peers.iter().map(|(i, t)| (addr(*i), report(t))).collect(), missing: Vec::new() }
}

#[test]
fn a_lone_node_adopts_every_partition_at_epoch_one() {
    let r = ring(&[0]);
    let acts = plan(addr(0), &r, &Table::default(), &HashMap::new(), &Survey::default(), true);
    assert_eq!(acts.len(), PARTITIONS as usize);
    assert!(acts.iter().all(|a| matches!(a, Action::Adopt { epoch: 1, .. })));
}

#[test]
fn a_joining_node_pulls_exactly_its_new_partitions_from_their_holders_at_a_higher_epoch() {
    let (r2, r3) = (ring(&[0, 1]), ring(&[0, 1, 2]));
    let (t0, t1) = (owned(0, &r2, 3, Holding::Active), owned(1, &r2, 5, Holding::Active));
    let acts = plan(addr(2), &r3, &Table::default(), &HashMap::new(), &survey(&[(0, &t0), (1, &t1)]), true);
    let mine = (0..PARTITIONS).filter(|p| r3.partition_owner(*p as usize) == Some(addr(2))).count();
    assert!(mine > 200, "about a third of the partitions move");
    assert_eq!(acts.len(), mine);
    for a in acts {
        let Action::Pull { p, from, epoch } = a else { panic!("{a:?}") };
        assert_eq!(r3.partition_owner(p as usize), Some(addr(2)));
        assert_eq!(r2.partition_owner(p as usize), Some(from), "pulled from the node that held it");
        let held = if from == addr(0) { 3 } else { 5 };
        assert_eq!(epoch, held + 1);
    }
    // The holders do nothing: they wait to be pulled.
    assert!(plan(addr(0), &r3, &t0, &HashMap::new(), &survey(&[(1, &t1), (2, &Table::default())]), true).is_empty());
}

#[test]
fn nothing_is_adopted_while_a_live_member_did_not_answer() {
    let r = ring(&[0, 1]);
    let s = Survey { answered: HashMap::new(), missing: vec![addr(1)] };
    assert!(plan(addr(0), &r, &Table::default(), &HashMap::new(), &s, true).is_empty(), "its holdings are unknown");
}

#[test]
fn a_restarted_node_pulls_the_served_copy_and_its_parked_copy_loses() {
    let r = ring(&[0, 1]);
    // Node 1 restarted: what it held is parked at epoch 4. Node 0 served it meanwhile at 5.
    let parked = owned(1, &r, 4, Holding::Parked);
    let mut served = Table::default();
    for (p, _) in parked.held() {
        served.set(p, Part { epoch: 5, holding: Some(Holding::Active) });
    }
    let acts = plan(addr(1), &r, &parked, &HashMap::new(), &survey(&[(0, &served)]), true);
    assert!(!acts.is_empty());
    assert!(acts.iter().all(|a| matches!(a, Action::Pull { from, epoch: 6, .. } if *from == addr(0))), "{acts:?}");
}

#[test]
fn the_freshest_parked_copy_wins_when_nobody_serves() {
    let r = ring(&[0, 1]);
    let p = (0..PARTITIONS).find(|p| r.partition_owner(*p as usize) == Some(addr(0))).unwrap();
    let mut mine = Table::default();
    mine.set(p, Part { epoch: 2, holding: Some(Holding::Parked) });
    let mut theirs = Table::default();
    theirs.set(p, Part { epoch: 7, holding: Some(Holding::Parked) });
    let acts = plan(addr(0), &r, &mine, &HashMap::new(), &survey(&[(1, &theirs)]), true);
    assert_eq!(about(acts, p), vec![Action::Pull { p, from: addr(1), epoch: 8 }]);
    // With the fresher copy here, it is adopted.
    let acts = plan(addr(0), &r, &theirs, &HashMap::new(), &survey(&[(1, &mine)]), true);
    assert_eq!(about(acts, p), vec![Action::Adopt { p, epoch: 8 }]);
    // And the other node discards its stale parked copy once this one serves.
    let mut served = Table::default();
    served.set(p, Part { epoch: 8, holding: Some(Holding::Active) });
    let acts = plan(addr(1), &r, &mine, &HashMap::new(), &survey(&[(0, &served)]), true);
    assert_eq!(about(acts, p), vec![Action::Discard { p }]);
}

#[test]
fn a_lent_partition_is_forgotten_once_the_borrower_serves_it_and_reclaimed_if_the_borrower_is_gone() {
    let r = ring(&[0, 1]);
    let p = (0..PARTITIONS).find(|p| r.partition_owner(*p as usize) == Some(addr(0))).unwrap();
    let mut lent = Table::default();
    lent.set(p, Part { epoch: 3, holding: Some(Holding::Lent { to: addr(1), to_epoch: 4 }) });
    let mut borrower = Table::default();
    borrower.set(p, Part { epoch: 4, holding: Some(Holding::Active) });
    assert_eq!(
        about(plan(addr(0), &r, &lent, &HashMap::new(), &survey(&[(1, &borrower)]), true), p),
        vec![Action::ForgetLent { p }]
    );
    // The borrower died before installing: this node owns it by the ring again.
    assert_eq!(
        about(plan(addr(0), &r, &lent, &HashMap::new(), &Survey::default(), true), p),
        vec![Action::Reclaim { p, epoch: 5 }]
    );
    // The borrower lives but lost it (restarted): same.
    let acts = plan(addr(0), &r, &lent, &HashMap::new(), &survey(&[(1, &Table::default())]), true);
    assert_eq!(about(acts, p), vec![Action::Reclaim { p, epoch: 5 }]);
}

#[test]
fn two_served_copies_are_merged_by_the_rings_owner() {
    let r = ring(&[0, 1]);
    let p = (0..PARTITIONS).find(|p| r.partition_owner(*p as usize) == Some(addr(0))).unwrap();
    let mut a = Table::default();
    a.set(p, Part { epoch: 1, holding: Some(Holding::Active) });
    let b = a.clone();
    let acts = plan(addr(0), &r, &a, &HashMap::new(), &survey(&[(1, &b)]), true);
    assert_eq!(about(acts, p), vec![Action::Pull { p, from: addr(1), epoch: 2 }]);
    assert!(about(plan(addr(1), &r, &b, &HashMap::new(), &survey(&[(0, &a)]), true), p).is_empty());
}

#[test]
fn routes_follow_the_table_first_and_the_ring_for_the_rest() {
    let r = ring(&[0, 1]);
    let mine = (0..PARTITIONS).find(|p| r.partition_owner(*p as usize) == Some(addr(0))).unwrap();
    let theirs = (0..PARTITIONS).find(|p| r.partition_owner(*p as usize) == Some(addr(1))).unwrap();
    let mut t = Table::default();
    t.set(theirs, Part { epoch: 2, holding: Some(Holding::Active) });
    let none = HashMap::new();
    let routes = routes(addr(0), &r, &t, &none);
    assert_eq!(routes.of(theirs as usize), Route::Local, "held here: served here until handed over");
    assert_eq!(routes.of(mine as usize), Route::Incoming, "owned by the ring, not installed yet");
    assert!(routes.incoming() > 0 && routes.serves_any());
    let mut t2 = Table::default();
    t2.set(mine, Part { epoch: 2, holding: Some(Holding::Lent { to: addr(1), to_epoch: 3 }) });
    assert_eq!(super::routes(addr(0), &r, &t2, &none).of(mine as usize), Route::Remote(addr(1)));
}

#[test]
fn an_owned_partition_still_served_elsewhere_is_forwarded_there_until_pulled() {
    let r = ring(&[0, 1]);
    let mine = (0..PARTITIONS).find(|p| r.partition_owner(*p as usize) == Some(addr(0))).unwrap();
    let other_mine = (0..PARTITIONS).filter(|p| r.partition_owner(*p as usize) == Some(addr(0))).nth(1).unwrap();
    let theirs = (0..PARTITIONS).find(|p| r.partition_owner(*p as usize) == Some(addr(1))).unwrap();
    let mut t = Table::default();
    t.set(other_mine, Part { epoch: 4, holding: Some(Holding::Active) });
    // The survey saw node 2 serve `mine` (and, stale, `other_mine` and `theirs`).
    let via: HashMap<u16, SocketAddr> = [(mine, addr(2)), (other_mine, addr(2)), (theirs, addr(2))].into();
    let routes = routes(addr(0), &r, &t, &via);
    assert_eq!(routes.of(mine as usize), Route::Via(addr(2)), "still served by its holder: forwarded there");
    assert!(routes.of(mine as usize).is_incoming(), "and counted as incoming (not ready)");
    assert_eq!(routes.of(mine as usize).forward_to(), Some(addr(2)));
    assert_eq!(routes.of(other_mine as usize), Route::Local, "installed here: the table wins");
    assert_eq!(routes.of(theirs as usize), Route::Remote(addr(1)), "not owned here: the ring owner");
    assert_eq!(routes.incoming(), routes_without_via_incoming(&r, &t));
    // A holder that is this node itself (a stale survey) never makes a loop.
    let selfish: HashMap<u16, SocketAddr> = [(mine, addr(0))].into();
    assert_eq!(super::routes(addr(0), &r, &t, &selfish).of(mine as usize), Route::Incoming);
}

fn routes_without_via_incoming(r: &Ring, t: &Table) -> usize {
    super::routes(addr(0), r, t, &HashMap::new()).incoming()
}

#[test]
fn empty_routes_know_nobody() {
    assert_eq!(Routes::empty(addr(0)).of(5), Route::Unknown);
}

#[test]
fn table_entries_round_trip_through_the_store_encoding() {
    for part in [
        Part { epoch: 0, holding: None },
        Part { epoch: 9, holding: Some(Holding::Active) },
        Part { epoch: u64::MAX, holding: Some(Holding::Parked) },
        Part { epoch: 3, holding: Some(Holding::Lent { to: addr(4), to_epoch: 4 }) },
    ] {
        assert_eq!(Table::decode(&Table::encode(&part)), Some(part));
    }
    assert_eq!(Table::decode(&[1, 2]), None);
    assert_eq!(Table::decode(&[0, 0, 0, 0, 0, 0, 0, 1, 9]), None);
}

/// Replicas of `lost`'s partitions by the ring `r`, as its first distinct successor
/// `me` keeps them: partition → epoch.
fn replicas_of(lost: u16, me: u16, r: &Ring, epoch: u64) -> HashMap<u16, u64> {
    (0..PARTITIONS)
        .filter(|p| r.partition_successors(*p as usize, 2) == vec![addr(lost), addr(me)])
        .map(|p| (p, epoch))
        .collect()
}

#[test]
fn the_successor_promotes_its_replica_when_the_owner_is_lost() {
    let (r3, r2) = (ring(&[0, 1, 2]), ring(&[1, 2]));
    let reps = replicas_of(0, 1, &r3, 4);
    assert!(reps.len() > 100, "node 1 follows a good share of node 0's partitions");
    // Node 0 died: nobody serves its partitions; node 1 holds replicas of some at epoch 4.
    let t2 = owned(2, &r3, 4, Holding::Active);
    let acts = plan(addr(1), &r2, &owned(1, &r3, 4, Holding::Active), &reps, &survey(&[(2, &t2)]), true);
    for &p in reps.keys() {
        assert_eq!(r2.partition_owner(p as usize), Some(addr(1)), "the first successor is the next owner");
        assert_eq!(about(acts.clone(), p), vec![Action::Promote { p, epoch: 5 }]);
    }
}

#[test]
fn a_fresher_copy_elsewhere_beats_this_nodes_replica_and_a_parked_copy_loses_a_tie() {
    let r = ring(&[0, 1]);
    let p = (0..PARTITIONS).find(|p| r.partition_owner(*p as usize) == Some(addr(0))).unwrap();
    let mine: HashMap<u16, u64> = [(p, 3)].into();
    // The old owner restarted with its disk at epoch 3: the replica (kept current) wins.
    let mut parked = Table::default();
    parked.set(p, Part { epoch: 3, holding: Some(Holding::Parked) });
    let acts = plan(addr(0), &r, &Table::default(), &mine, &survey(&[(1, &parked)]), true);
    assert_eq!(about(acts, p), vec![Action::Promote { p, epoch: 4 }]);
    // A replica at a higher epoch elsewhere (a later owner's) wins over this one.
    let s = Survey {
        answered: [(addr(1), vec![PeerHolding { partition: p, epoch: 6, holding: Holding::Replica }])].into(),
        missing: Vec::new(),
    };
    let acts = plan(addr(0), &r, &Table::default(), &mine, &s, true);
    assert_eq!(about(acts, p), vec![Action::Pull { p, from: addr(1), epoch: 7 }]);
    // Never while a member is silent: it may still serve the partition.
    let s = Survey { answered: HashMap::new(), missing: vec![addr(1)] };
    assert!(about(plan(addr(0), &r, &Table::default(), &mine, &s, true), p).is_empty());
}

#[test]
fn a_replica_is_dropped_once_a_newer_copy_is_served_and_kept_at_the_owners_epoch() {
    let r = ring(&[0, 1]);
    let p = (0..PARTITIONS).find(|p| r.partition_owner(*p as usize) == Some(addr(0))).unwrap();
    let mine: HashMap<u16, u64> = [(p, 3)].into();
    let mut served = Table::default();
    served.set(p, Part { epoch: 3, holding: Some(Holding::Active) });
    assert!(about(plan(addr(1), &r, &Table::default(), &mine, &survey(&[(0, &served)]), true), p).is_empty());
    served.set(p, Part { epoch: 5, holding: Some(Holding::Active) });
    let acts = plan(addr(1), &r, &Table::default(), &mine, &survey(&[(0, &served)]), true);
    assert_eq!(about(acts, p), vec![Action::DropReplica { p, below: 5 }]);
}

#[test]
fn a_lent_partition_is_not_taken_back_while_the_borrower_installs_it_even_if_it_holds_a_replica() {
    let r = ring(&[0, 1]);
    let p = (0..PARTITIONS).find(|p| r.partition_owner(*p as usize) == Some(addr(0))).unwrap();
    let mut lent = Table::default();
    lent.set(p, Part { epoch: 3, holding: Some(Holding::Lent { to: addr(1), to_epoch: 4 }) });
    // The borrower (often the partition's replica) is still pulling it.
    let s = Survey {
        answered: [(
            addr(1),
            vec![
                PeerHolding { partition: p, epoch: 3, holding: Holding::Replica },
                PeerHolding { partition: p, epoch: 0, holding: Holding::Pulling },
            ],
        )]
        .into(),
        missing: Vec::new(),
    };
    assert!(about(plan(addr(0), &r, &lent, &HashMap::new(), &s, true), p).is_empty());
    // A replica alone (no pull in progress) means the borrower lost it: reclaim.
    let s = Survey {
        answered: [(addr(1), vec![PeerHolding { partition: p, epoch: 3, holding: Holding::Replica }])].into(),
        missing: Vec::new(),
    };
    assert_eq!(about(plan(addr(0), &r, &lent, &HashMap::new(), &s, true), p), vec![Action::Reclaim { p, epoch: 5 }]);
}

#[test]
fn a_stale_served_copy_stands_down_for_a_higher_epoch() {
    let r = ring(&[0, 1]);
    let p = (0..PARTITIONS).find(|p| r.partition_owner(*p as usize) == Some(addr(0))).unwrap();
    // Node 0 was frozen at epoch 3; node 1 promoted its replica at 4 meanwhile.
    let mut stale = Table::default();
    stale.set(p, Part { epoch: 3, holding: Some(Holding::Active) });
    let mut newer = Table::default();
    newer.set(p, Part { epoch: 4, holding: Some(Holding::Active) });
    assert_eq!(
        about(plan(addr(0), &r, &stale, &HashMap::new(), &survey(&[(1, &newer)]), true), p),
        vec![Action::StandDown { p }]
    );
    // The newer copy does nothing about the stale one (it is not the ring's owner).
    assert!(about(plan(addr(1), &r, &newer, &HashMap::new(), &survey(&[(0, &stale)]), true), p).is_empty());
}

#[test]
fn the_rings_owner_never_merges_a_stale_copy_into_its_own() {
    let r = ring(&[0, 1]);
    let p = (0..PARTITIONS).find(|p| r.partition_owner(*p as usize) == Some(addr(1))).unwrap();
    // Node 0 served p at 3 and was frozen; node 1, the ring's owner now, serves it at 4,
    // where a trip expired meanwhile. Merging node 0's copy would bring that trip back.
    let mut stale = Table::default();
    stale.set(p, Part { epoch: 3, holding: Some(Holding::Active) });
    let mut current = Table::default();
    current.set(p, Part { epoch: 4, holding: Some(Holding::Active) });
    assert!(about(plan(addr(1), &r, &current, &HashMap::new(), &survey(&[(0, &stale)]), true), p).is_empty());
    assert_eq!(
        about(plan(addr(0), &r, &stale, &HashMap::new(), &survey(&[(1, &current)]), true), p),
        vec![Action::StandDown { p }]
    );
}

#[test]
fn quorum_is_a_strict_majority_of_the_base_heard_within_the_lease() {
    use std::time::Duration;
    use tokio::time::Instant;
    let now = Instant::now();
    let lease = Duration::from_secs(1);
    let base: Vec<SocketAddr> = (0..3).map(addr).collect();
    let fresh = |ids: &[u16]| -> HashMap<SocketAddr, Instant> { ids.iter().map(|i| (addr(*i), now)).collect() };
    assert!(has_quorum(addr(0), &base, &fresh(&[1]), now, lease), "2 of 3");
    assert!(!has_quorum(addr(0), &base, &fresh(&[]), now, lease), "1 of 3: cut off");
    let old: HashMap<SocketAddr, Instant> = [(addr(1), now - Duration::from_secs(2))].into();
    assert!(!has_quorum(addr(0), &base, &old, now, lease), "heard too long ago (a thawed node)");
    assert!(has_quorum(addr(0), &[], &HashMap::new(), now, lease), "alone");
    assert!(has_quorum(addr(0), &[addr(0)], &HashMap::new(), now, lease));
    let four: Vec<SocketAddr> = (0..4).map(addr).collect();
    assert!(!has_quorum(addr(0), &four, &fresh(&[1]), now, lease), "2 of 4 is no majority: a 2-2 split stops both");
    assert!(has_quorum(addr(0), &four, &fresh(&[1, 2]), now, lease));
}

#[test]
fn a_copy_being_promoted_elsewhere_makes_a_stale_server_stand_down_but_a_merge_does_not() {
    let r = ring(&[0, 1]);
    let p = (0..PARTITIONS).find(|p| r.partition_owner(*p as usize) == Some(addr(0))).unwrap();
    let mut stale = Table::default();
    stale.set(p, Part { epoch: 3, holding: Some(Holding::Active) });
    let promoting = |also_active: bool| {
        let mut v = vec![PeerHolding { partition: p, epoch: 4, holding: Holding::Pulling }];
        if also_active {
            v.push(PeerHolding { partition: p, epoch: 3, holding: Holding::Active });
        }
        Survey { answered: [(addr(1), v)].into(), missing: Vec::new() }
    };
    assert_eq!(
        about(plan(addr(0), &r, &stale, &HashMap::new(), &promoting(false), false), p),
        vec![Action::StandDown { p }]
    );
    // A node that serves it too and pulls this copy is merging: wait to be pulled.
    assert!(
        !about(plan(addr(0), &r, &stale, &HashMap::new(), &promoting(true), false), p)
            .contains(&Action::StandDown { p })
    );
    // A node serving with its lease is not stale: a pull elsewhere at a higher epoch is
    // a new owner pulling from it (the lend is on its way), not a promotion.
    assert!(about(plan(addr(0), &r, &stale, &HashMap::new(), &promoting(false), true), p).is_empty());
}

#[test]
fn the_quorum_lease_runs_out_a_lease_after_the_majoritys_last_agreement() {
    use std::time::Duration;
    use tokio::time::Instant;
    let now = Instant::now();
    let far = now + Duration::from_secs(3600);
    let lease = Duration::from_secs(1);
    let five: Vec<SocketAddr> = (0..5).map(addr).collect();
    // Needs 2 of the 4 others: the second freshest decides.
    let heard: HashMap<SocketAddr, Instant> =
        [(addr(1), now), (addr(2), now - Duration::from_millis(300)), (addr(3), now - Duration::from_secs(5))].into();
    assert_eq!(quorum_until(addr(0), &five, &heard, lease, far), Some(now - Duration::from_millis(300) + lease));
    assert_eq!(quorum_until(addr(0), &five, &HashMap::new(), lease, far), None);
    assert_eq!(quorum_until(addr(0), &[addr(0)], &HashMap::new(), lease, far), Some(far));
}

#[test]
fn a_holder_lends_only_to_the_rings_owner_above_its_epoch_from_where_the_state_is() {
    let (req, other) = (addr(2), addr(3));
    let held = |h| Part { epoch: 4, holding: Some(h) };
    let alive = |_: &SocketAddr| true;
    let dead = |a: &SocketAddr| *a != other;
    assert_eq!(
        lend(req, Some(other), held(Holding::Active), None, 5, alive),
        Err(LendRefusal::NotOwner { owner: Some(other) })
    );
    assert_eq!(lend(req, None, held(Holding::Active), None, 5, alive), Err(LendRefusal::NotOwner { owner: None }));
    assert_eq!(lend(req, Some(req), held(Holding::Active), None, 5, alive), Ok(LendFrom::Shards));
    assert_eq!(lend(req, Some(req), held(Holding::Parked), None, 5, alive), Ok(LendFrom::Parked));
    assert_eq!(
        lend(req, Some(req), held(Holding::Active), None, 4, alive),
        Err(LendRefusal::StaleEpoch { wanted: 4, held: 4 })
    );
    // Lent already: again to the same borrower (its pull was lost), or anew once the
    // other borrower is gone; never to two live borrowers.
    let lent = |to| held(Holding::Lent { to, to_epoch: 5 });
    assert_eq!(lend(req, Some(req), lent(req), None, 6, alive), Ok(LendFrom::Shards));
    assert_eq!(lend(req, Some(req), lent(other), None, 6, alive), Err(LendRefusal::LentTo(other)));
    assert_eq!(lend(req, Some(req), lent(other), None, 6, dead), Ok(LendFrom::Shards));
    // Not held: only an in-sync replica older than the requester's epoch is handed over.
    let none = Part { epoch: 0, holding: None };
    assert_eq!(lend(req, Some(req), none, Some(3), 5, alive), Ok(LendFrom::Replica));
    assert_eq!(lend(req, Some(req), none, Some(5), 5, alive), Err(LendRefusal::NotHeld));
    assert_eq!(lend(req, Some(req), none, None, 5, alive), Err(LendRefusal::NotHeld));
}

#[test]
fn the_quorum_base_grows_with_the_ring_and_forgets_a_crashed_member_only_once_confirmed() {
    use std::time::Duration;
    let t0 = tokio::time::Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    let confirm = Duration::from_secs(3);
    let none = |_: &SocketAddr| false;
    let (a, b, c, d) = (addr(1), addr(2), addr(3), addr(4));
    // Stored under another address: a new member, alone until it sees the ring.
    let mut base = QuorumBase::new(a, vec![b, c]);
    assert!(base.alone());
    assert!(base.update(at(0), &[a, b, c], none, true, confirm));
    assert_eq!(base.members(), &[a, b, c]);
    assert!(!base.alone());
    // Members that just joined count as heard for a lease.
    let mut heard = HashMap::new();
    base.count_joins(at(1), Duration::from_secs(2), &mut heard);
    assert_eq!(heard.keys().copied().collect::<std::collections::BTreeSet<_>>(), [b, c].into());
    let mut heard = HashMap::new();
    base.count_joins(at(5), Duration::from_secs(2), &mut heard);
    assert!(heard.is_empty());
    // c crashes: out of the ring. Without a held lease nothing is confirmed, however long.
    for s in [10, 20, 100] {
        assert!(!base.update(at(s), &[a, b], none, false, confirm));
    }
    assert_eq!(base.members(), &[a, b, c]);
    // A lease held on the ring without c, past the grace, confirms it; it is forgotten
    // BASE_FORGET after it left the ring (at once, here: that was long ago).
    assert!(base.update(at(101), &[a, b], none, true, confirm));
    assert_eq!(base.members(), &[a, b]);
    // Again, with the lease held all along: not before BASE_FORGET.
    base.update(at(110), &[a, b, c], none, true, confirm);
    base.update(at(120), &[a, b], none, true, confirm);
    assert!(!base.update(at(120 + BASE_FORGET.as_secs() - 1), &[a, b], none, true, confirm));
    assert!(base.update(at(120 + BASE_FORGET.as_secs()), &[a, b], none, true, confirm));
    assert_eq!(base.members(), &[a, b]);
    // d joins, then leaves gracefully: gone at once.
    assert!(base.update(at(200), &[a, b, d], none, true, confirm));
    assert!(base.update(at(201), &[a, b], |x: &SocketAddr| *x == d, true, confirm));
    assert_eq!(base.members(), &[a, b]);
    // A member back in the ring before it was forgotten stays.
    assert!(base.update(at(300), &[a, b, c], none, true, confirm));
    base.update(at(301), &[a, b], none, true, confirm);
    base.update(at(302), &[a, b, c], none, true, confirm);
    base.update(at(400), &[a, b, c], none, true, confirm);
    assert_eq!(base.members(), &[a, b, c]);
    // Stored and read back.
    assert_eq!(QuorumBase::decode(&base.encode()), vec![a, b, c]);
    assert_eq!(QuorumBase::new(a, QuorumBase::decode(&base.encode())).members(), &[a, b, c]);
}

#[test]
fn a_member_that_just_went_down_stays_in_the_base() {
    use std::time::Duration;
    let t0 = tokio::time::Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let none = |_: &SocketAddr| false;
    let (a, b, c, d) = (addr(1), addr(2), addr(3), addr(4));
    let mut base = QuorumBase::new(a, vec![]);
    base.update(at(0), &[a], none, true, Duration::from_secs(2));
    base.update(at(100), &[a, b, c], none, true, Duration::from_secs(2));
    for ms in (200..20_000).step_by(200) {
        base.update(at(ms), &[a, b, c], none, true, Duration::from_secs(2));
    }
    base.update(at(20_000), &[a, b, c, d], none, true, Duration::from_secs(2));
    for ms in (20_200..40_000).step_by(200) {
        base.update(at(ms), &[a, b, c, d], none, true, Duration::from_secs(2));
    }
    for ms in (40_000..45_000).step_by(200) {
        base.update(at(ms), &[a, b, d], none, true, Duration::from_secs(2));
    }
    assert_eq!(base.members(), &[a, b, c, d]);
}

#[test]
fn the_survey_names_who_serves_each_partition_the_higher_epoch_winning() {
    let (mut a, mut b) = (Table::default(), Table::default());
    a.set(1, Part { epoch: 3, holding: Some(Holding::Active) });
    b.set(1, Part { epoch: 5, holding: Some(Holding::Active) });
    a.set(2, Part { epoch: 7, holding: Some(Holding::Active) });
    b.set(2, Part { epoch: 4, holding: Some(Holding::Active) });
    b.set(3, Part { epoch: 9, holding: Some(Holding::Lent { to: addr(0), to_epoch: 10 }) });
    a.set(4, Part { epoch: 2, holding: Some(Holding::Parked) });
    let served = survey(&[(1, &a), (2, &b)]).serving();
    assert_eq!(served.get(&1), Some(&(5, addr(2))), "the stale copy at epoch 3 loses");
    assert_eq!(served.get(&2), Some(&(7, addr(1))));
    assert_eq!(served.get(&3), None, "lent: not served there");
    assert_eq!(served.get(&4), None, "parked: not served");
    assert_eq!(served.len(), 2);
}

#[test]
fn a_partition_being_installed_elsewhere_is_not_promoted_from_a_replica_meanwhile() {
    let r = ring(&[0, 1, 2]);
    let p = (0..PARTITIONS).find(|p| r.partition_owner(*p as usize) == Some(addr(0))).unwrap();
    let replicas: HashMap<u16, u64> = [(p, 2)].into();
    // Node 1 still installs it (its lender has just forgotten it): nobody serves it yet.
    let installing = Survey {
        answered: [
            (addr(1), vec![PeerHolding { partition: p, epoch: 2, holding: Holding::Pulling }]),
            (addr(2), vec![]),
        ]
        .into(),
        missing: Vec::new(),
    };
    assert!(about(plan(addr(0), &r, &Table::default(), &replicas, &installing, true), p).is_empty());
    // Nobody pulling it either: the owner was lost, the replica is promoted.
    let lost = Survey { answered: [(addr(1), vec![]), (addr(2), vec![])].into(), missing: Vec::new() };
    assert_eq!(
        about(plan(addr(0), &r, &Table::default(), &replicas, &lost, true), p),
        vec![Action::Promote { p, epoch: 3 }]
    );
}
