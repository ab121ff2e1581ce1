//! Values crossing the database boundary, the same on both engines.
//!
//! Parameters are anything implementing [`ToSqlValue`]; result rows are read into
//! [`Row`]s of [`Value`]s, decoded with [`FromSqlValue`]. Keeping our own small value
//! type (rather than each driver's traits) is what lets a store write a query once.

use std::error::Error as StdError;
use std::sync::Arc;

use bytes::BytesMut;
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type, to_sql_checked};

use crate::StoreError;

/// A parameter value, borrowed from the caller for the duration of the statement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SqlValue<'a> {
    /// SQL NULL.
    Null,
    /// Any integer column (binds to PostgreSQL `SMALLINT`, `INTEGER` or `BIGINT`,
    /// with a range check).
    Integer(i64),
    /// A floating-point column.
    Real(f64),
    /// Text; also binds to PostgreSQL `JSON`/`JSONB` columns.
    Text(&'a str),
    /// Bytes (`BYTEA` / `BLOB`).
    Blob(&'a [u8]),
    /// A boolean (stored as 0/1 on SQLite).
    Bool(bool),
    /// A list of strings: PostgreSQL `TEXT[]`; a JSON array in a TEXT column on
    /// SQLite, which has no arrays.
    TextArray(&'a [String]),
}

/// A Rust value that can be bound as a statement parameter.
///
/// ```
/// # use store_core::{SqlValue, ToSqlValue};
/// let user_id = "@alice:example.com".to_owned();
/// let params: &[&dyn ToSqlValue] = &[&user_id, &42i64, &None::<i64>];
/// assert_eq!(params[2].to_sql_value(), SqlValue::Null);
/// ```
pub trait ToSqlValue: Sync {
    /// The value to bind.
    fn to_sql_value(&self) -> SqlValue<'_>;
}

macro_rules! integer_to_sql {
    ($($ty:ty),*) => {$(
        impl ToSqlValue for $ty {
            fn to_sql_value(&self) -> SqlValue<'_> {
                SqlValue::Integer(i64::from(*self))
            }
        }
    )*};
}
integer_to_sql!(i8, i16, i32, i64, u8, u16, u32);

impl ToSqlValue for f64 {
    fn to_sql_value(&self) -> SqlValue<'_> {
        SqlValue::Real(*self)
    }
}
impl ToSqlValue for bool {
    fn to_sql_value(&self) -> SqlValue<'_> {
        SqlValue::Bool(*self)
    }
}
impl ToSqlValue for str {
    fn to_sql_value(&self) -> SqlValue<'_> {
        SqlValue::Text(self)
    }
}
impl ToSqlValue for String {
    fn to_sql_value(&self) -> SqlValue<'_> {
        SqlValue::Text(self)
    }
}
impl ToSqlValue for [u8] {
    fn to_sql_value(&self) -> SqlValue<'_> {
        SqlValue::Blob(self)
    }
}
impl ToSqlValue for Vec<u8> {
    fn to_sql_value(&self) -> SqlValue<'_> {
        SqlValue::Blob(self)
    }
}
impl ToSqlValue for [String] {
    fn to_sql_value(&self) -> SqlValue<'_> {
        SqlValue::TextArray(self)
    }
}
impl ToSqlValue for Vec<String> {
    fn to_sql_value(&self) -> SqlValue<'_> {
        SqlValue::TextArray(self)
    }
}
impl<T: ToSqlValue + ?Sized> ToSqlValue for &T {
    fn to_sql_value(&self) -> SqlValue<'_> {
        (**self).to_sql_value()
    }
}
impl<T: ToSqlValue> ToSqlValue for Option<T> {
    fn to_sql_value(&self) -> SqlValue<'_> {
        self.as_ref().map_or(SqlValue::Null, ToSqlValue::to_sql_value)
    }
}
impl ToSqlValue for Value {
    fn to_sql_value(&self) -> SqlValue<'_> {
        match self {
            Value::Null => SqlValue::Null,
            Value::Integer(v) => SqlValue::Integer(*v),
            Value::Real(v) => SqlValue::Real(*v),
            Value::Text(v) => SqlValue::Text(v),
            Value::Blob(v) => SqlValue::Blob(v),
            Value::Bool(v) => SqlValue::Bool(*v),
            Value::TextArray(v) => SqlValue::TextArray(v),
        }
    }
}

impl From<SqlValue<'_>> for Value {
    /// An owned copy of a parameter, for a statement sent later
    /// ([`Transaction::execute_at_commit`](crate::Transaction::execute_at_commit)).
    fn from(value: SqlValue<'_>) -> Value {
        match value {
            SqlValue::Null => Value::Null,
            SqlValue::Integer(v) => Value::Integer(v),
            SqlValue::Real(v) => Value::Real(v),
            SqlValue::Text(v) => Value::Text(v.to_owned()),
            SqlValue::Blob(v) => Value::Blob(v.to_vec()),
            SqlValue::Bool(v) => Value::Bool(v),
            SqlValue::TextArray(v) => Value::TextArray(v.to_vec()),
        }
    }
}

/// A value read from a result row.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// An integer of any width.
    Integer(i64),
    /// A floating-point number.
    Real(f64),
    /// Text (also PostgreSQL `JSON`/`JSONB`, as their text).
    Text(String),
    /// Bytes.
    Blob(Vec<u8>),
    /// A PostgreSQL boolean. SQLite has none and returns [`Value::Integer`].
    Bool(bool),
    /// A PostgreSQL `TEXT[]`. SQLite returns the JSON text instead.
    TextArray(Vec<String>),
}

/// A Rust type a column can be decoded into.
pub trait FromSqlValue: Sized {
    /// Converts `value`, or says why it cannot.
    fn from_sql_value(value: &Value) -> Result<Self, String>;
}

fn mismatch(expected: &str, value: &Value) -> String {
    format!("expected {expected}, found {value:?}")
}

impl FromSqlValue for i64 {
    fn from_sql_value(value: &Value) -> Result<Self, String> {
        match value {
            Value::Integer(v) => Ok(*v),
            other => Err(mismatch("an integer", other)),
        }
    }
}
impl FromSqlValue for i32 {
    fn from_sql_value(value: &Value) -> Result<Self, String> {
        let wide = i64::from_sql_value(value)?;
        i32::try_from(wide).map_err(|_| format!("{wide} does not fit in i32"))
    }
}
impl FromSqlValue for u32 {
    fn from_sql_value(value: &Value) -> Result<Self, String> {
        let wide = i64::from_sql_value(value)?;
        u32::try_from(wide).map_err(|_| format!("{wide} does not fit in u32"))
    }
}
impl FromSqlValue for f64 {
    fn from_sql_value(value: &Value) -> Result<Self, String> {
        match value {
            Value::Real(v) => Ok(*v),
            // SQLite stores a REAL with no fractional part as an integer when the
            // column has INTEGER affinity.
            #[expect(clippy::cast_precision_loss, reason = "SQLite integers standing in for reals are small")]
            Value::Integer(v) => Ok(*v as f64),
            other => Err(mismatch("a number", other)),
        }
    }
}
impl FromSqlValue for bool {
    fn from_sql_value(value: &Value) -> Result<Self, String> {
        match value {
            Value::Bool(v) => Ok(*v),
            Value::Integer(0) => Ok(false),
            Value::Integer(1) => Ok(true),
            other => Err(mismatch("a boolean", other)),
        }
    }
}
impl FromSqlValue for String {
    fn from_sql_value(value: &Value) -> Result<Self, String> {
        match value {
            Value::Text(v) => Ok(v.clone()),
            other => Err(mismatch("text", other)),
        }
    }
}
impl FromSqlValue for Vec<u8> {
    fn from_sql_value(value: &Value) -> Result<Self, String> {
        match value {
            Value::Blob(v) => Ok(v.clone()),
            Value::Text(v) => Ok(v.clone().into_bytes()),
            other => Err(mismatch("bytes", other)),
        }
    }
}
impl FromSqlValue for Vec<String> {
    fn from_sql_value(value: &Value) -> Result<Self, String> {
        match value {
            Value::TextArray(v) => Ok(v.clone()),
            Value::Text(json) => {
                serde_json::from_str(json).map_err(|err| format!("not a JSON list of strings: {err}"))
            }
            other => Err(mismatch("a list of strings", other)),
        }
    }
}
impl<T: FromSqlValue> FromSqlValue for Option<T> {
    fn from_sql_value(value: &Value) -> Result<Self, String> {
        match value {
            Value::Null => Ok(None),
            other => T::from_sql_value(other).map(Some),
        }
    }
}
impl FromSqlValue for Value {
    fn from_sql_value(value: &Value) -> Result<Self, String> {
        Ok(value.clone())
    }
}

/// One result row: values by position, with the column names of the result set.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    columns: Arc<[String]>,
    values: Vec<Value>,
}

/// A way to pick a column: by position (`0`) or by name (`"stream_id"`).
pub trait ColumnIndex: std::fmt::Debug {
    /// The position of the column in `columns`, if present.
    fn position(&self, columns: &[String]) -> Option<usize>;
}
impl ColumnIndex for usize {
    fn position(&self, columns: &[String]) -> Option<usize> {
        (*self < columns.len()).then_some(*self)
    }
}
impl ColumnIndex for &str {
    fn position(&self, columns: &[String]) -> Option<usize> {
        columns.iter().position(|name| name == self)
    }
}

impl Row {
    /// Decodes the column at `index` as `T`.
    ///
    /// Errors (never panics) when the column does not exist or holds another type:
    /// rows come from the database, which a bug or a migration may have changed.
    pub fn get<T: FromSqlValue>(&self, index: impl ColumnIndex) -> Result<T, StoreError> {
        let position = index.position(&self.columns).ok_or_else(|| StoreError::Decode {
            column: format!("{index:?}"),
            message: format!("no such column; the row has {:?}", self.columns),
        })?;
        T::from_sql_value(&self.values[position])
            .map_err(|message| StoreError::Decode { column: self.columns[position].clone(), message })
    }

    /// The raw values, in column order.
    pub fn values(&self) -> &[Value] {
        &self.values
    }

    /// The column names, in order.
    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    /// A row of `values` under `columns` (shared by every row of a result).
    pub(crate) fn new(columns: Arc<[String]>, values: Vec<Value>) -> Row {
        Row { columns, values }
    }

    pub(crate) fn from_postgres_rows(
        rows: &[tokio_postgres::Row],
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        let Some(first) = rows.first() else { return Ok(Vec::new()) };
        let columns: Arc<[String]> = first.columns().iter().map(|column| column.name().to_owned()).collect();
        rows.iter()
            .map(|row| {
                let values =
                    (0..columns.len()).map(|idx| row.try_get::<_, Value>(idx)).collect::<Result<_, _>>()?;
                Ok(Row { columns: Arc::clone(&columns), values })
            })
            .collect()
    }
}

/// Reads any supported PostgreSQL column into a [`Value`].
impl<'a> FromSql<'a> for Value {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn StdError + Sync + Send>> {
        Ok(match *ty {
            Type::INT2 => Value::Integer(i64::from(i16::from_sql(ty, raw)?)),
            Type::INT4 => Value::Integer(i64::from(i32::from_sql(ty, raw)?)),
            Type::INT8 => Value::Integer(i64::from_sql(ty, raw)?),
            Type::OID => Value::Integer(i64::from(u32::from_sql(ty, raw)?)),
            Type::FLOAT4 => Value::Real(f64::from(f32::from_sql(ty, raw)?)),
            Type::FLOAT8 => Value::Real(f64::from_sql(ty, raw)?),
            Type::BOOL => Value::Bool(bool::from_sql(ty, raw)?),
            Type::BYTEA => Value::Blob(raw.to_vec()),
            Type::TEXT_ARRAY | Type::VARCHAR_ARRAY => Value::TextArray(Vec::<String>::from_sql(ty, raw)?),
            Type::JSON => Value::Text(std::str::from_utf8(raw)?.to_owned()),
            // Binary JSONB is a version byte (1) followed by the JSON text.
            Type::JSONB => match raw.split_first() {
                Some((1, text)) => Value::Text(std::str::from_utf8(text)?.to_owned()),
                _ => return Err("unsupported JSONB binary format".into()),
            },
            _ => Value::Text(String::from_sql(ty, raw)?),
        })
    }

    fn from_sql_null(_: &Type) -> Result<Self, Box<dyn StdError + Sync + Send>> {
        Ok(Value::Null)
    }

    fn accepts(ty: &Type) -> bool {
        matches!(
            *ty,
            Type::INT2
                | Type::INT4
                | Type::INT8
                | Type::OID
                | Type::FLOAT4
                | Type::FLOAT8
                | Type::BOOL
                | Type::BYTEA
                | Type::JSON
                | Type::JSONB
                | Type::TEXT_ARRAY
                | Type::VARCHAR_ARRAY
        ) || <String as FromSql>::accepts(ty)
    }
}

/// Binds a [`SqlValue`] to whatever type PostgreSQL inferred for the placeholder.
#[derive(Debug)]
pub(crate) struct PgParam<'a>(pub(crate) SqlValue<'a>);

impl ToSql for PgParam<'_> {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        match self.0 {
            SqlValue::Null => Ok(IsNull::Yes),
            SqlValue::Integer(v) => match *ty {
                Type::INT2 => i16::try_from(v)?.to_sql(ty, out),
                Type::INT4 => i32::try_from(v)?.to_sql(ty, out),
                Type::INT8 => v.to_sql(ty, out),
                #[expect(
                    clippy::cast_precision_loss,
                    reason = "an integer bound to a float column, as SQL itself converts"
                )]
                Type::FLOAT8 => (v as f64).to_sql(ty, out),
                _ => Err(format!("cannot bind an integer to a {ty} parameter").into()),
            },
            SqlValue::Real(v) => match *ty {
                #[expect(
                    clippy::cast_possible_truncation,
                    reason = "the column is REAL; PostgreSQL would round too"
                )]
                Type::FLOAT4 => (v as f32).to_sql(ty, out),
                Type::FLOAT8 => v.to_sql(ty, out),
                _ => Err(format!("cannot bind a float to a {ty} parameter").into()),
            },
            SqlValue::Text(v) => match *ty {
                Type::JSON => {
                    out.extend_from_slice(v.as_bytes());
                    Ok(IsNull::No)
                }
                Type::JSONB => {
                    out.extend_from_slice(&[1]);
                    out.extend_from_slice(v.as_bytes());
                    Ok(IsNull::No)
                }
                _ => v.to_sql(ty, out),
            },
            SqlValue::Blob(v) => v.to_sql(ty, out),
            SqlValue::Bool(v) => v.to_sql(ty, out),
            SqlValue::TextArray(v) => v.to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        // The real check is in `to_sql`, which knows the value as well as the type.
        true
    }

    to_sql_checked!();
}
