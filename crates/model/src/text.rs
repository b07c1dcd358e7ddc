//! Compact text and metadata for instance specs. A registry holds millions of specs made of
//! short strings (ids, addresses, zones, versions); `Text` keeps strings of up to 24 bytes
//! inline, without a heap allocation, and `Metadata` is one sorted vector instead of a B-tree
//! node per instance. Both serialise exactly as `String` and a string map do, so stored
//! records and the JSON API are unchanged.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A short string stored inline when it fits (≤ 24 bytes).
pub type Text = compact_str::CompactString;

/// Instance metadata: string keys to string values, sorted by key, keys unique.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Metadata(Vec<(Text, Text)>);

impl Metadata {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `key` to `value`, replacing an earlier value.
    pub fn insert(&mut self, key: impl Into<Text>, value: impl Into<Text>) {
        let key = key.into();
        match self
            .0
            .binary_search_by(|(k, _)| k.as_str().cmp(key.as_str()))
        {
            Ok(i) => self.0[i].1 = value.into(),
            Err(i) => self.0.insert(i, (key, value.into())),
        }
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(k, _)| k.as_str().cmp(key))
            .ok()
            .map(|i| self.0[i].1.as_str())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Entries in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

impl<K: Into<Text>, V: Into<Text>> FromIterator<(K, V)> for Metadata {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let map: BTreeMap<Text, Text> = iter
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        let mut v: Vec<_> = map.into_iter().collect();
        v.shrink_to_fit();
        Metadata(v)
    }
}

impl fmt::Debug for Metadata {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Serialize for Metadata {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Metadata {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = BTreeMap::<Text, Text>::deserialize(d)?;
        Ok(map.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorted_unique_and_map_shaped() {
        let mut m: Metadata = [("b", "2"), ("a", "1")].into_iter().collect();
        m.insert("a", "one");
        m.insert("c", "3");
        assert_eq!(
            m.iter().collect::<Vec<_>>(),
            vec![("a", "one"), ("b", "2"), ("c", "3")]
        );
        assert_eq!(m.get("b"), Some("2"));
        assert_eq!(m.get("z"), None);
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, r#"{"a":"one","b":"2","c":"3"}"#);
        let back: Metadata = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);
    }
}
