//! A table's records in memory: by id, and by group (a snapshot's source volume),
//! so that listing one group's records costs what that group holds, not what the
//! whole table does.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use super::Record;

pub struct Entries<T: Record> {
    by_id: BTreeMap<String, T>,
    /// (group, id) of every record with a group.
    by_group: BTreeSet<(String, String)>,
}

impl<T: Record> Entries<T> {
    pub fn new(by_id: BTreeMap<String, T>) -> Self {
        let by_group = by_id.values().filter_map(key).collect();
        Entries { by_id, by_group }
    }

    pub fn into_map(self) -> BTreeMap<String, T> {
        self.by_id
    }

    pub fn get(&self, id: &str) -> Option<&T> {
        self.by_id.get(id)
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.by_id.values()
    }

    pub fn insert(&mut self, rec: T) {
        if let Some(old) = self.by_id.insert(rec.id().to_string(), rec.clone()) {
            if let Some(k) = key(&old) {
                self.by_group.remove(&k);
            }
        }
        if let Some(k) = key(&rec) {
            self.by_group.insert(k);
        }
    }

    pub fn remove(&mut self, id: &str) {
        if let Some(k) = self.by_id.remove(id).as_ref().and_then(key) {
            self.by_group.remove(&k);
        }
    }

    /// Records with ids after `after`, in id order.
    pub fn after<'a>(&'a self, after: Option<&str>) -> impl Iterator<Item = &'a T> + 'a {
        let lower = match after {
            Some(a) => Bound::Excluded(a.to_string()),
            None => Bound::Unbounded,
        };
        self.by_id
            .range((lower, Bound::Unbounded))
            .map(|(_, rec)| rec)
    }

    /// The records of `group` with ids after `after`, in id order.
    pub fn of_group_after<'a>(
        &'a self,
        group: &'a str,
        after: Option<&str>,
    ) -> impl Iterator<Item = &'a T> + 'a {
        let lower = match after {
            Some(a) => Bound::Excluded((group.to_string(), a.to_string())),
            None => Bound::Included((group.to_string(), String::new())),
        };
        self.by_group
            .range((lower, Bound::Unbounded))
            .take_while(move |(g, _)| g == group)
            .filter_map(|(_, id)| self.by_id.get(id))
    }
}

fn key<T: Record>(rec: &T) -> Option<(String, String)> {
    rec.group().map(|g| (g.to_string(), rec.id().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::snapshot_of as snap;
    use crate::store::SnapshotRecord;

    fn ids<'a>(it: impl Iterator<Item = &'a SnapshotRecord>) -> Vec<&'a str> {
        it.map(|s| s.id.as_str()).collect()
    }

    #[test]
    fn groups_follow_inserts_replacements_and_removals() {
        let mut e = Entries::new(
            [snap("a", "v1"), snap("b", "v2"), snap("c", "v1")]
                .into_iter()
                .map(|s| (s.id.clone(), s))
                .collect(),
        );
        assert_eq!(ids(e.of_group_after("v1", None)), ["a", "c"]);
        assert_eq!(ids(e.of_group_after("v1", Some("a"))), ["c"]);
        assert_eq!(ids(e.of_group_after("v1", Some("c"))), Vec::<&str>::new());
        assert_eq!(ids(e.of_group_after("v", None)), Vec::<&str>::new());
        e.insert(snap("d", "v1"));
        e.insert(snap("a", "v2")); // a record replaced with another group
        e.remove("c");
        e.remove("nothing");
        assert_eq!(ids(e.of_group_after("v1", None)), ["d"]);
        assert_eq!(ids(e.of_group_after("v2", None)), ["a", "b"]);
        assert_eq!(ids(e.after(Some("a"))), ["b", "d"]);
        assert_eq!(e.len(), 3);
    }
}
