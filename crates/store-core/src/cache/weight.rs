//! How much memory a cached key or value holds, so that a [`Cache`](super::Cache)
//! can be bounded by bytes as well as by entries.

use std::collections::BTreeMap;
use std::mem::{size_of, size_of_val};
use std::sync::Arc;

/// An estimate of the heap memory a cached key or value owns, in bytes.
///
/// Count only what lies behind pointers (a `String`'s buffer, a `Vec`'s
/// elements and what they own in turn): the cache adds each entry's inline size
/// and its own bookkeeping. A cache weighs a value once, when it is filled, and
/// never on a hit; an implementation walks what the load just built, so its
/// cost is in proportion to the load's, and being within a small factor of the
/// truth is enough.
pub trait CacheWeight {
    /// The bytes on the heap this owns, estimated.
    fn weight(&self) -> usize;
}

macro_rules! weightless {
    ($($ty:ty),* $(,)?) => {
        $(impl CacheWeight for $ty {
            fn weight(&self) -> usize {
                0
            }
        })*
    };
}

weightless!((), bool, char, u8, u16, u32, u64, usize, i8, i16, i32, i64, isize);

/// A borrowed string owns nothing (the cache holds only `'static` ones).
impl CacheWeight for &str {
    fn weight(&self) -> usize {
        0
    }
}

impl CacheWeight for String {
    fn weight(&self) -> usize {
        self.capacity()
    }
}

impl<T: CacheWeight> CacheWeight for Option<T> {
    fn weight(&self) -> usize {
        self.as_ref().map_or(0, CacheWeight::weight)
    }
}

impl<T: CacheWeight> CacheWeight for Vec<T> {
    fn weight(&self) -> usize {
        self.capacity() * size_of::<T>() + self.iter().map(CacheWeight::weight).sum::<usize>()
    }
}

/// The strong and weak counts in front of an `Arc`'s value.
const ARC_HEADER: usize = 2 * size_of::<usize>();

/// A shared value is counted whole by every holder, so the budget errs on the
/// side of holding less.
impl<T: CacheWeight + ?Sized> CacheWeight for Arc<T> {
    fn weight(&self) -> usize {
        ARC_HEADER + size_of_val::<T>(self) + T::weight(self)
    }
}

/// A B-tree node's header, its edges and its spare slots, spread over its
/// entries: nodes are at least half full, so about two pointers per entry.
const BTREE_OVERHEAD_PER_ENTRY: usize = 2 * size_of::<usize>();

impl<K: CacheWeight, V: CacheWeight> CacheWeight for BTreeMap<K, V> {
    fn weight(&self) -> usize {
        let slots = self.len() * (size_of::<K>() + size_of::<V>() + BTREE_OVERHEAD_PER_ENTRY);
        slots + self.iter().map(|(key, value)| key.weight() + value.weight()).sum::<usize>()
    }
}

/// Recursion follows the value's nesting, which serde_json's parser caps at 128
/// levels for everything read from the database.
impl CacheWeight for serde_json::Value {
    fn weight(&self) -> usize {
        use serde_json::Value;
        match self {
            Value::Null | Value::Bool(_) | Value::Number(_) => 0,
            Value::String(text) => text.weight(),
            Value::Array(items) => items.weight(),
            // serde_json's map is a B-tree (an index map with `preserve_order`,
            // which costs about as much per entry).
            Value::Object(map) => {
                let slots = map.len() * (size_of::<String>() + size_of::<Value>() + BTREE_OVERHEAD_PER_ENTRY);
                slots + map.iter().map(|(key, value)| key.weight() + value.weight()).sum::<usize>()
            }
        }
    }
}

macro_rules! tuple_weight {
    ($($name:ident),+) => {
        impl<$($name: CacheWeight),+> CacheWeight for ($($name,)+) {
            fn weight(&self) -> usize {
                #[allow(non_snake_case)]
                let ($($name,)+) = self;
                0 $(+ $name.weight())+
            }
        }
    };
}

tuple_weight!(A, B);
tuple_weight!(A, B, C);
tuple_weight!(A, B, C, D);
