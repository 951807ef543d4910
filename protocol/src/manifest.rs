//! Manifests: the ordered list of extents that rebuilds one snapshot, stored as a tree of
//! sealed nodes so that a 2 TB image needs no giant object and an unchanged stretch of an
//! image reuses the manifest nodes of the previous snapshot.
//!
//! A leaf lists extents (a data chunk, or a run of zeros restored as a hole); a branch lists
//! child node ids with the bytes each child covers. Nodes end where an entry's id has its low
//! bits clear (content-defined, like the chunks themselves), so a change in one part of an
//! image changes only the nodes on its path to the root.
//!
//! Node format, version 1:
//!
//! ```text
//! u8  MANIFEST_VERSION
//! u8  kind: 0 = leaf, 1 = branch
//! u32 n_entries (1..=NODE_ENTRIES_MAX; a leaf of an empty image has 0)
//! leaf entry:   u8 0, id[32], u32 len_bytes    (data chunk)
//!            |  u8 1, u64 len_bytes            (zeros)
//! branch entry: id[32], u64 span_bytes
//! ```

use thiserror::Error;

use crate::codec::{DecodeError, Reader, Writer};
use crate::ids::ChunkId;

pub const MANIFEST_VERSION: u8 = 1;
/// The most entries one node may hold; a decoder rejects more.
pub const NODE_ENTRIES_MAX: u32 = 8192;
/// A node is not cut before it has this many entries.
const NODE_ENTRIES_MIN: usize = 64;
/// A node ends after an entry whose id has these bits clear: about 1024 entries a node.
const NODE_BOUNDARY_MASK: u16 = 0x03ff;
/// The deepest tree a reader follows. 8 levels of 64 entries is far beyond any disk.
pub const TREE_DEPTH_MAX: usize = 8;

const KIND_LEAF: u8 = 0;
const KIND_BRANCH: u8 = 1;
const EXTENT_DATA: u8 = 0;
const EXTENT_ZERO: u8 = 1;

/// One piece of an image, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extent {
    Data { id: ChunkId, len_bytes: u32 },
    Zero { len_bytes: u64 },
}

impl Extent {
    pub fn len_bytes(&self) -> u64 {
        match *self {
            Extent::Data { len_bytes, .. } => u64::from(len_bytes),
            Extent::Zero { len_bytes } => len_bytes,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BranchEntry {
    pub id: ChunkId,
    pub span_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    Leaf(Vec<Extent>),
    Branch(Vec<BranchEntry>),
}

impl Node {
    pub fn encode(&self) -> Vec<u8> {
        let n_entries = match self {
            Node::Leaf(extents) => extents.len(),
            Node::Branch(children) => children.len(),
        };
        assert!(
            n_entries <= NODE_ENTRIES_MAX as usize,
            "builder bounds node size"
        );
        let mut w = Writer::with_capacity(6 + n_entries * 41);
        w.u8(MANIFEST_VERSION);
        match self {
            Node::Leaf(extents) => {
                w.u8(KIND_LEAF);
                w.u32(extents.len() as u32);
                for extent in extents {
                    match *extent {
                        Extent::Data { id, len_bytes } => {
                            w.u8(EXTENT_DATA);
                            w.array(&id.0);
                            w.u32(len_bytes);
                        }
                        Extent::Zero { len_bytes } => {
                            w.u8(EXTENT_ZERO);
                            w.u64(len_bytes);
                        }
                    }
                }
            }
            Node::Branch(children) => {
                w.u8(KIND_BRANCH);
                w.u32(children.len() as u32);
                for child in children {
                    w.array(&child.id.0);
                    w.u64(child.span_bytes);
                }
            }
        }
        let bytes = w.finish();
        debug_assert_eq!(Node::decode(&bytes).as_ref(), Ok(self));
        bytes
    }

    pub fn decode(bytes: &[u8]) -> Result<Node, DecodeError> {
        let mut r = Reader::new(bytes);
        r.version("manifest node", MANIFEST_VERSION)?;
        let kind = r.u8()?;
        let n_entries = r.u32()?;
        if n_entries > NODE_ENTRIES_MAX {
            return Err(DecodeError::TooMany {
                what: "manifest node entries",
                count: u64::from(n_entries),
                max: u64::from(NODE_ENTRIES_MAX),
            });
        }
        let node = match kind {
            KIND_LEAF => {
                let mut extents = Vec::with_capacity(n_entries as usize);
                for _ in 0..n_entries {
                    extents.push(match r.u8()? {
                        EXTENT_DATA => Extent::Data {
                            id: ChunkId(r.array()?),
                            len_bytes: r.u32()?,
                        },
                        EXTENT_ZERO => Extent::Zero {
                            len_bytes: r.u64()?,
                        },
                        tag => {
                            return Err(DecodeError::Invalid {
                                what: "manifest extent",
                                why: format!("unknown tag {tag}"),
                            })
                        }
                    });
                }
                Node::Leaf(extents)
            }
            KIND_BRANCH => {
                let mut children = Vec::with_capacity(n_entries as usize);
                for _ in 0..n_entries {
                    children.push(BranchEntry {
                        id: ChunkId(r.array()?),
                        span_bytes: r.u64()?,
                    });
                }
                if children.is_empty() {
                    return Err(DecodeError::Invalid {
                        what: "manifest branch",
                        why: "no children".into(),
                    });
                }
                Node::Branch(children)
            }
            kind => {
                return Err(DecodeError::Invalid {
                    what: "manifest node",
                    why: format!("unknown kind {kind}"),
                })
            }
        };
        r.finish()?;
        Ok(node)
    }
}

fn ends_node(id: &ChunkId, n_entries: usize) -> bool {
    n_entries >= NODE_ENTRIES_MAX as usize
        || (n_entries >= NODE_ENTRIES_MIN
            && u16::from_le_bytes([id.0[0], id.0[1]]) & NODE_BOUNDARY_MASK == 0)
}

/// The root of a stored manifest: what a snapshot record points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ManifestRoot {
    pub id: ChunkId,
    pub size_bytes: u64,
}

/// Builds a manifest tree from extents in image order. Each finished node is handed to the
/// `store` callback as encoded bytes; the callback stores it as a chunk and returns its id.
#[derive(Default)]
pub struct ManifestBuilder {
    leaf: Vec<Extent>,
    /// branches[k] holds the entries of the open node at height k + 1.
    branches: Vec<Vec<BranchEntry>>,
    size_bytes: u64,
}

impl ManifestBuilder {
    pub fn new() -> ManifestBuilder {
        ManifestBuilder::default()
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    pub fn push<E>(
        &mut self,
        extent: Extent,
        store: &mut impl FnMut(Vec<u8>) -> Result<ChunkId, E>,
    ) -> Result<(), E> {
        if extent.len_bytes() == 0 {
            return Ok(());
        }
        self.size_bytes += extent.len_bytes();
        if let (Extent::Zero { len_bytes }, Some(Extent::Zero { len_bytes: last })) =
            (extent, self.leaf.last_mut())
        {
            *last += len_bytes;
            return Ok(());
        }
        self.leaf.push(extent);
        if let Extent::Data { id, .. } = extent {
            if ends_node(&id, self.leaf.len()) {
                self.emit_leaf(store)?;
            }
        } else if self.leaf.len() >= NODE_ENTRIES_MAX as usize {
            self.emit_leaf(store)?;
        }
        Ok(())
    }

    fn emit_leaf<E>(
        &mut self,
        store: &mut impl FnMut(Vec<u8>) -> Result<ChunkId, E>,
    ) -> Result<(), E> {
        let extents = std::mem::take(&mut self.leaf);
        let span_bytes = extents.iter().map(Extent::len_bytes).sum();
        let id = store(Node::Leaf(extents).encode())?;
        self.push_branch(0, BranchEntry { id, span_bytes }, store)
    }

    fn push_branch<E>(
        &mut self,
        level: usize,
        entry: BranchEntry,
        store: &mut impl FnMut(Vec<u8>) -> Result<ChunkId, E>,
    ) -> Result<(), E> {
        if self.branches.len() == level {
            assert!(level < TREE_DEPTH_MAX, "64-entry minimum bounds depth");
            self.branches.push(Vec::new());
        }
        self.branches[level].push(entry);
        if ends_node(&entry.id, self.branches[level].len()) {
            self.emit_branch(level, store)?;
        }
        Ok(())
    }

    fn emit_branch<E>(
        &mut self,
        level: usize,
        store: &mut impl FnMut(Vec<u8>) -> Result<ChunkId, E>,
    ) -> Result<(), E> {
        let children = std::mem::take(&mut self.branches[level]);
        let span_bytes = children.iter().map(|c| c.span_bytes).sum();
        let id = store(Node::Branch(children).encode())?;
        self.push_branch(level + 1, BranchEntry { id, span_bytes }, store)
    }

    /// Stores the remaining open nodes and returns the root.
    pub fn finish<E>(
        mut self,
        store: &mut impl FnMut(Vec<u8>) -> Result<ChunkId, E>,
    ) -> Result<ManifestRoot, E> {
        if !self.leaf.is_empty() || self.branches.is_empty() {
            self.emit_leaf(store)?;
        }
        let mut level = 0;
        loop {
            let is_top = level + 1 == self.branches.len();
            if is_top && self.branches[level].len() == 1 {
                let root = self.branches[level][0];
                assert_eq!(root.span_bytes, self.size_bytes);
                return Ok(ManifestRoot {
                    id: root.id,
                    size_bytes: self.size_bytes,
                });
            }
            if !self.branches[level].is_empty() {
                self.emit_branch(level, store)?;
            }
            level += 1;
        }
    }
}

#[derive(Debug, Error)]
pub enum ManifestError<E> {
    #[error("manifest node {id} could not be loaded")]
    Load { id: ChunkId, source: E },
    #[error("manifest node {id} is malformed")]
    Decode { id: ChunkId, source: DecodeError },
    #[error("manifest is deeper than {TREE_DEPTH_MAX} levels")]
    TooDeep,
    #[error("manifest node {id} covers {actual} bytes but its parent says {expected}")]
    SpanMismatch {
        id: ChunkId,
        expected: u64,
        actual: u64,
    },
}

enum Frame {
    Leaf {
        extents: Vec<Extent>,
        next: usize,
    },
    Branch {
        children: Vec<BranchEntry>,
        next: usize,
    },
}

/// Walks a manifest tree in image order, loading nodes through a callback as it goes, so
/// memory stays at one node per level.
pub struct ManifestWalk {
    pending_root: Option<ChunkId>,
    /// (frame, id of its node, image offset where the node must end)
    stack: Vec<(Frame, ChunkId, u64)>,
    offset: u64,
    size_bytes: u64,
}

impl ManifestWalk {
    pub fn new(root: ManifestRoot) -> ManifestWalk {
        ManifestWalk {
            pending_root: Some(root.id),
            stack: Vec::new(),
            offset: 0,
            size_bytes: root.size_bytes,
        }
    }

    /// The image offset of the next extent.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The next extent and its image offset, or None at the end.
    pub fn next<E>(
        &mut self,
        load: &mut impl FnMut(&ChunkId) -> Result<Vec<u8>, E>,
    ) -> Result<Option<(u64, Extent)>, ManifestError<E>> {
        if let Some(root) = self.pending_root.take() {
            let size_bytes = self.size_bytes;
            self.descend(root, size_bytes, load)?;
        }
        loop {
            let Some((frame, id, end)) = self.stack.last_mut() else {
                return Ok(None);
            };
            match frame {
                Frame::Leaf { extents, next } if *next < extents.len() => {
                    let extent = extents[*next];
                    *next += 1;
                    let offset = self.offset;
                    // Checked before the extent is handed out, so nothing is ever written
                    // past the end a parent (or the snapshot record) promised.
                    match offset
                        .checked_add(extent.len_bytes())
                        .filter(|&extent_end| extent_end <= *end)
                    {
                        Some(extent_end) => self.offset = extent_end,
                        None => {
                            return Err(ManifestError::SpanMismatch {
                                id: *id,
                                expected: *end,
                                actual: offset.saturating_add(extent.len_bytes()),
                            })
                        }
                    }
                    return Ok(Some((offset, extent)));
                }
                Frame::Branch { children, next } if *next < children.len() => {
                    let child = children[*next];
                    *next += 1;
                    let child_end = match self
                        .offset
                        .checked_add(child.span_bytes)
                        .filter(|&e| e <= *end)
                    {
                        Some(child_end) => child_end,
                        None => {
                            return Err(ManifestError::SpanMismatch {
                                id: *id,
                                expected: *end,
                                actual: self.offset.saturating_add(child.span_bytes),
                            })
                        }
                    };
                    self.descend(child.id, child_end, load)?;
                }
                _ => {
                    if self.offset != *end {
                        return Err(ManifestError::SpanMismatch {
                            id: *id,
                            expected: *end,
                            actual: self.offset,
                        });
                    }
                    self.stack.pop();
                }
            }
        }
    }

    fn descend<E>(
        &mut self,
        id: ChunkId,
        end: u64,
        load: &mut impl FnMut(&ChunkId) -> Result<Vec<u8>, E>,
    ) -> Result<(), ManifestError<E>> {
        if self.stack.len() >= TREE_DEPTH_MAX {
            return Err(ManifestError::TooDeep);
        }
        let bytes = load(&id).map_err(|source| ManifestError::Load { id, source })?;
        let frame =
            match Node::decode(&bytes).map_err(|source| ManifestError::Decode { id, source })? {
                Node::Leaf(extents) => Frame::Leaf { extents, next: 0 },
                Node::Branch(children) => Frame::Branch { children, next: 0 },
            };
        self.stack.push((frame, id, end));
        Ok(())
    }
}

/// Adds every chunk a manifest references, its own nodes included, to `live`: the mark
/// of a prune. A node already in `live` is not loaded again, since its whole subtree was
/// marked with it, so snapshots that share unchanged stretches cost one read per distinct
/// node. Any node that cannot be loaded or decoded is an error: an incomplete mark must
/// never sweep.
pub fn mark<E>(
    root: ManifestRoot,
    live: &mut std::collections::BTreeSet<ChunkId>,
    load: &mut impl FnMut(&ChunkId) -> Result<Vec<u8>, E>,
) -> Result<(), ManifestError<E>> {
    // (node, depth); depth-first, so memory stays at the nodes of a few levels.
    let mut stack = vec![(root.id, 1usize)];
    while let Some((id, depth)) = stack.pop() {
        if live.contains(&id) {
            continue;
        }
        if depth > TREE_DEPTH_MAX {
            return Err(ManifestError::TooDeep);
        }
        let bytes = load(&id).map_err(|source| ManifestError::Load { id, source })?;
        match Node::decode(&bytes).map_err(|source| ManifestError::Decode { id, source })? {
            Node::Leaf(extents) => live.extend(extents.iter().filter_map(|e| match e {
                Extent::Data { id, .. } => Some(*id),
                Extent::Zero { .. } => None,
            })),
            Node::Branch(children) => {
                stack.extend(children.iter().rev().map(|c| (c.id, depth + 1)));
            }
        }
        // Inserted once its children are queued: a failure further down stops the mark.
        live.insert(id);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn id_of(bytes: &[u8]) -> ChunkId {
        ChunkId(*blake3::hash(bytes).as_bytes())
    }

    fn build(extents: &[Extent], nodes: &mut BTreeMap<ChunkId, Vec<u8>>) -> ManifestRoot {
        let mut store = |bytes: Vec<u8>| -> Result<ChunkId, ()> {
            let id = id_of(&bytes);
            nodes.insert(id, bytes);
            Ok(id)
        };
        let mut builder = ManifestBuilder::new();
        for extent in extents {
            builder.push(*extent, &mut store).unwrap();
        }
        builder.finish(&mut store).unwrap()
    }

    fn walk(root: ManifestRoot, nodes: &BTreeMap<ChunkId, Vec<u8>>) -> Vec<(u64, Extent)> {
        let mut walk = ManifestWalk::new(root);
        let mut load = |id: &ChunkId| nodes.get(id).cloned().ok_or(());
        let mut out = Vec::new();
        while let Some(item) = walk.next(&mut load).unwrap() {
            out.push(item);
        }
        out
    }

    fn extent_strategy() -> impl Strategy<Value = Extent> {
        prop_oneof![
            (any::<u64>(), 1u32..1 << 21).prop_map(|(n, len_bytes)| Extent::Data {
                id: id_of(&n.to_le_bytes()),
                len_bytes
            }),
            (1u64..1 << 40).prop_map(|len_bytes| Extent::Zero { len_bytes }),
        ]
    }

    /// Adjacent zero runs merge; that is the only change a round trip makes.
    fn normalised(extents: &[Extent]) -> Vec<Extent> {
        let mut out: Vec<Extent> = Vec::new();
        for &extent in extents {
            match (extent, out.last_mut()) {
                (Extent::Zero { len_bytes }, Some(Extent::Zero { len_bytes: last })) => {
                    *last += len_bytes
                }
                _ => out.push(extent),
            }
        }
        out
    }

    proptest! {
        #[test]
        fn node_encoding_round_trips(extents in proptest::collection::vec(extent_strategy(), 0..200)) {
            let node = Node::Leaf(extents);
            prop_assert_eq!(Node::decode(&node.encode()).unwrap(), node);
        }

        #[test]
        fn node_decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Node::decode(&bytes);
        }

        #[test]
        fn tree_round_trips(extents in proptest::collection::vec(extent_strategy(), 0..3000)) {
            let mut nodes = BTreeMap::new();
            let root = build(&extents, &mut nodes);
            let walked = walk(root, &nodes);
            let expected = normalised(&extents);
            prop_assert_eq!(walked.iter().map(|(_, e)| *e).collect::<Vec<_>>(), expected);
            let mut offset = 0;
            for (at, extent) in &walked {
                prop_assert_eq!(*at, offset);
                offset += extent.len_bytes();
            }
            prop_assert_eq!(offset, root.size_bytes);
        }
    }

    #[test]
    fn large_manifests_form_a_tree_and_share_unchanged_nodes() {
        let extents: Vec<Extent> = (0..50_000u64)
            .map(|n| Extent::Data {
                id: id_of(&n.to_le_bytes()),
                len_bytes: 4096,
            })
            .collect();
        let mut nodes_a = BTreeMap::new();
        let root_a = build(&extents, &mut nodes_a);
        assert!(
            nodes_a.len() > 40,
            "50k extents need many nodes, got {}",
            nodes_a.len()
        );
        assert!(matches!(
            Node::decode(&nodes_a[&root_a.id]).unwrap(),
            Node::Branch(_)
        ));
        assert_eq!(walk(root_a, &nodes_a).len(), extents.len());

        // Change one extent in the middle: only the nodes on its path are new.
        let mut changed = extents.clone();
        changed[25_000] = Extent::Data {
            id: id_of(b"changed"),
            len_bytes: 4096,
        };
        let mut nodes_b = BTreeMap::new();
        build(&changed, &mut nodes_b);
        let n_new = nodes_b
            .keys()
            .filter(|id| !nodes_a.contains_key(id))
            .count();
        assert!(n_new <= 4, "{n_new} new nodes for one changed extent");
    }

    #[test]
    fn a_mark_holds_every_chunk_and_node_and_reads_shared_nodes_once() {
        let extents: Vec<Extent> = (0..20_000u64)
            .map(|n| Extent::Data {
                id: id_of(&n.to_le_bytes()),
                len_bytes: 4096,
            })
            .collect();
        let mut changed = extents.clone();
        changed[10_000] = Extent::Data {
            id: id_of(b"changed"),
            len_bytes: 4096,
        };
        let mut nodes = BTreeMap::new();
        let root_a = build(&extents, &mut nodes);
        let root_b = build(&changed, &mut nodes);
        let mut loads = 0;
        let mut load = |id: &ChunkId| {
            loads += 1;
            nodes.get(id).cloned().ok_or(())
        };
        let mut live = std::collections::BTreeSet::new();
        mark(root_a, &mut live, &mut load).unwrap();
        mark(root_b, &mut live, &mut load).unwrap();
        let mut expected: std::collections::BTreeSet<ChunkId> = nodes.keys().copied().collect();
        for (_, e) in walk(root_a, &nodes).into_iter().chain(walk(root_b, &nodes)) {
            if let Extent::Data { id, .. } = e {
                expected.insert(id);
            }
        }
        assert_eq!(live, expected);
        assert_eq!(loads, nodes.len(), "each distinct node is read once");

        // A node that cannot be read fails the mark.
        let child = match Node::decode(&nodes[&root_a.id]).unwrap() {
            Node::Branch(children) => children[1].id,
            Node::Leaf(_) => unreachable!("20k extents make a branch"),
        };
        let mut missing = |id: &ChunkId| {
            if *id == child {
                Err(())
            } else {
                nodes.get(id).cloned().ok_or(())
            }
        };
        let mut partial = std::collections::BTreeSet::new();
        assert!(matches!(
            mark(root_a, &mut partial, &mut missing),
            Err(ManifestError::Load { id, .. }) if id == child
        ));
    }

    #[test]
    fn empty_image_has_an_empty_leaf_root() {
        let mut nodes = BTreeMap::new();
        let root = build(&[], &mut nodes);
        assert_eq!(root.size_bytes, 0);
        assert!(walk(root, &nodes).is_empty());
    }

    #[test]
    fn a_lying_span_is_caught() {
        let mut nodes = BTreeMap::new();
        let leaf = Node::Leaf(vec![Extent::Zero { len_bytes: 10 }]).encode();
        let leaf_id = id_of(&leaf);
        nodes.insert(leaf_id, leaf);
        let branch = Node::Branch(vec![BranchEntry {
            id: leaf_id,
            span_bytes: 11,
        }])
        .encode();
        let branch_id = id_of(&branch);
        nodes.insert(branch_id, branch);
        let mut walk = ManifestWalk::new(ManifestRoot {
            id: branch_id,
            size_bytes: 11,
        });
        let mut load = |id: &ChunkId| nodes.get(id).cloned().ok_or(());
        assert!(walk.next(&mut load).unwrap().is_some());
        assert!(matches!(
            walk.next(&mut load),
            Err(ManifestError::SpanMismatch { .. })
        ));
    }
}
