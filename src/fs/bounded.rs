//! Decoding a sequence under bounds: what keeps a peer's length prefix from
//! making us allocate (docs/design.md rule 2). Used for the xattrs of a
//! [`crate::fs::meta::Meta`] and for the wire's own lists ([`crate::wire::msg`]).

use serde::Deserialize;

/// A sequence decoded under bounds checked as it is read, before anything
/// beyond them exists: at most `limit` items (checked against the declared
/// length first), whose `cost` adds up to at most `budget`. Everything the
/// peer sends is hostile: a length prefix alone must not make us allocate
/// (docs/design.md rule 2).
pub(crate) struct Bounded<T> {
    pub limit: usize,
    pub what: &'static str,
    pub cost: fn(&T) -> usize,
    pub budget: usize,
    pub item: std::marker::PhantomData<T>,
}

impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Bounded<T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(self.what)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let declared = seq.size_hint().unwrap_or(0);
        if declared > self.limit {
            return Err(serde::de::Error::invalid_length(declared, &self));
        }
        let mut items = Vec::with_capacity(declared);
        let mut spent = 0usize;
        while let Some(item) = seq.next_element::<T>()? {
            spent = spent.saturating_add((self.cost)(&item));
            if items.len() == self.limit || spent > self.budget {
                return Err(serde::de::Error::invalid_length(items.len() + 1, &self));
            }
            items.push(item);
        }
        Ok(items)
    }
}
