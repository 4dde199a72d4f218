//! Stateless operators and how they fuse.
//!
//! A [`Chain`] is a statically composed sequence of stateless operators (map, filter, flat_map,
//! inspect, limit, ...) that runs on one thread with no channel hop between operators. Records
//! are *pushed* through it one at a time into an `Emit` (the stage's tail: a channel
//! partitioner or a sink), so the compiler sees the whole chain as one loop body: a fused chain
//! costs what the closures cost. A chain starts with [`Identity`] (records as the head gave
//! them) or, on a split source, with [`Stripes`] (each [`Stripe`] of the shared data handed on
//! record by record, read where the operators use it).
//!
//! Fallible steps (`try_map`, `try_flat_map`) carry an error policy ([`crate::OnError`]); every
//! step counts its events (records filtered, skipped, dead-lettered, a 1:N step's outputs) in
//! plain local integers, flushed once per batch into shared counters for the report's
//! per-step accounts — nothing atomic per record.
//!
//! The types here appear in [`Stream`](crate::Stream)'s type parameters; user code rarely needs
//! to name them, and writes `impl Chain<I, Out = T>` where it must (see the
//! [`Stream` docs](crate::Stream)). [`Chain`] is sealed: its methods are the engine's, and only
//! the crate implements it.

use std::any::Any;
use std::marker::PhantomData;
use std::sync::Arc;

use serde_json::Value;

use crate::dead_letter::{Bad, OnError, Rejected};
use crate::error::{BoxError, Error};
use crate::metrics::Shape;
use crate::sync::{AtomicU64, Ordering};

/// The seal of [`Chain`] — a public trait in a private module, so no other crate can implement
/// it — and what the engine's side of `Chain` names (`Halt`, `Emit`): public items in a private
/// module, so that they appear in the sealed trait's hidden methods without being part of the
/// crate's API.
pub(crate) mod sealed {
    use crate::error::Error;

    /// Implemented by every chain type of the crate.
    pub trait Sealed {}

    /// Why a chain stopped pushing records.
    #[derive(Debug)]
    pub enum Halt {
        /// No more input is wanted: a limit was reached, every consumer downstream is gone, or the
        /// run was cancelled. Not an error.
        Done,
        /// The run must fail with this error.
        Failed(Error),
    }

    impl From<Error> for Halt {
        fn from(e: Error) -> Self {
            Halt::Failed(e)
        }
    }

    /// Something records can be pushed into: the next operator, or a stage's tail.
    pub trait Emit<T> {
        /// Accepts one record, or says why no more are wanted.
        fn emit(&mut self, item: T) -> Result<(), Halt>;
    }

    impl<T, E: Emit<T> + ?Sized> Emit<T> for &mut E {
        #[inline]
        fn emit(&mut self, item: T) -> Result<(), Halt> {
            (**self).emit(item)
        }
    }

    impl<T> Emit<T> for Vec<T> {
        #[inline]
        fn emit(&mut self, item: T) -> Result<(), Halt> {
            self.push(item);
            Ok(())
        }
    }
}

pub(crate) use sealed::{Emit, Halt};

/// A fused sequence of stateless operators taking `In` and producing [`Chain::Out`].
///
/// Chains are cloned once per stage instance; shared closures live behind `Arc`s.
///
/// Sealed: only this crate implements it. Its methods are the engine's and hidden.
pub trait Chain<In>: sealed::Sealed + Clone + Send + 'static {
    /// The record type the chain emits.
    type Out: Send + 'static;
    /// Pushes one record through the chain into `out`.
    #[doc(hidden)]
    fn push<E: Emit<Self::Out>>(&mut self, item: In, out: &mut E) -> Result<(), Halt>;
    /// Called before the `records` records of each input batch are pushed: a reloadable step
    /// loads its version here, so the whole batch sees one version.
    #[doc(hidden)]
    #[inline]
    fn begin_batch(&mut self, _records: usize) {}
    /// Called after the records of each input batch were pushed (and before the stage ends):
    /// each step adds its local event counts to its shared ones.
    #[doc(hidden)]
    #[inline]
    fn end_batch(&mut self) {}
    /// The counted steps of the chain, in order (for the report's per-step accounts).
    #[doc(hidden)]
    fn steps(&self, _steps: &mut Vec<StepInfo>) {}
    /// Names of the operators in the chain, in order (used to name stages).
    #[doc(hidden)]
    fn names(&self, names: &mut Vec<Arc<str>>);
    /// Renames the last operator; false if the chain is empty.
    #[doc(hidden)]
    fn rename_last(&mut self, name: Arc<str>) -> bool;
    /// Lists the steps that hold state, with whether they can snapshot it (a composite step
    /// asks the steps before it first).
    #[doc(hidden)]
    fn state_support(&self, _out: &mut Vec<(Arc<str>, crate::checkpoint::StateSupport)>) {}
    /// Puts each stateful step's state into `state` (part `chain.<step name>`); a composite
    /// step puts the steps before it first.
    #[doc(hidden)]
    fn snapshot(
        &self,
        _state: &mut crate::checkpoint::state::InstanceState,
    ) -> Result<(), crate::Error> {
        Ok(())
    }
    /// Restores what [`snapshot`](Chain::snapshot) put.
    #[doc(hidden)]
    fn restore(
        &mut self,
        _state: &crate::checkpoint::state::InstanceState,
    ) -> Result<(), crate::Error> {
        Ok(())
    }
}

/// Event counts of one step, summed over its instances: updated once per batch.
#[derive(Debug, Default)]
pub(crate) struct StepCounts {
    pub filtered: AtomicU64,
    pub skipped: AtomicU64,
    pub dead_lettered: AtomicU64,
    /// Records emitted, for steps whose output is not derived from their input (1:N).
    pub out: AtomicU64,
    /// Records taken, for steps whose input is not the previous step's output (a step that
    /// parses blocks of lines counts the lines).
    pub records_in: AtomicU64,
}

/// One counted step of a chain: its name, shape and counts.
#[doc(hidden)]
#[derive(Debug, Clone)]
pub struct StepInfo {
    pub(crate) name: Arc<str>,
    pub(crate) shape: Shape,
    pub(crate) counts: Arc<StepCounts>,
    /// Whether the step counts its own input (`StepCounts::records_in`).
    pub(crate) counted_in: bool,
}

/// A step instance's counts since the last batch ended: plain integers, no atomics per record.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Local {
    pub filtered: u64,
    pub skipped: u64,
    pub dead_lettered: u64,
    pub out: u64,
    pub records_in: u64,
}

/// A step's local counts and the shared counts they are flushed into.
#[derive(Debug)]
pub(crate) struct Acc {
    pub local: Local,
    pub shared: Arc<StepCounts>,
}

impl Clone for Acc {
    fn clone(&self) -> Self {
        Acc {
            local: Local::default(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl Default for Acc {
    fn default() -> Self {
        Self::new()
    }
}

impl Acc {
    pub(crate) fn new() -> Self {
        Acc {
            local: Local::default(),
            shared: Arc::new(StepCounts::default()),
        }
    }

    /// Adds the local counts to the shared ones.
    #[inline]
    pub(crate) fn flush(&mut self) {
        let l = std::mem::take(&mut self.local);
        for (n, c) in [
            (l.filtered, &self.shared.filtered),
            (l.skipped, &self.shared.skipped),
            (l.dead_lettered, &self.shared.dead_lettered),
            (l.out, &self.shared.out),
            (l.records_in, &self.shared.records_in),
        ] {
            if n > 0 {
                c.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    pub(crate) fn info(&self, name: &Arc<str>, shape: Shape) -> StepInfo {
        StepInfo {
            name: Arc::clone(name),
            shape,
            counts: Arc::clone(&self.shared),
            counted_in: false,
        }
    }

    /// Counts what a policy did with a bad record.
    #[inline]
    pub(crate) fn count(local: &mut Local, r: Rejected) {
        match r {
            Rejected::Skipped => local.skipped += 1,
            Rejected::DeadLettered => local.dead_lettered += 1,
        }
    }
}

/// How a record the dead-letter policy may need is kept: a clone made before the operator
/// consumes it, turned into JSON only if the operator fails.
struct Keeper<A> {
    clone: fn(&A) -> A,
    json: fn(&A) -> Value,
}

fn to_json<A: serde::Serialize>(a: &A) -> Value {
    serde_json::to_value(a).unwrap_or(Value::Null)
}

/// A fallible step's error policy (and, for `DeadLetter`, how its input records are kept).
#[derive(Clone, Default)]
pub(crate) struct Policy {
    on_error: OnError,
    /// A `Keeper<A>` of the step's input type, set with a `DeadLetter` policy.
    keep: Option<Arc<dyn Any + Send + Sync>>,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.on_error.fmt(f)
    }
}

/// A kept input record and how to show it.
pub(crate) struct Kept<A> {
    rec: A,
    json: fn(&A) -> Value,
}

impl Policy {
    fn set<A: serde::Serialize + Clone + Send + 'static>(&mut self, on_error: OnError) {
        self.keep = on_error.is_dead_letter().then(|| {
            Arc::new(Keeper::<A> {
                clone: A::clone,
                json: to_json::<A>,
            }) as Arc<dyn Any + Send + Sync>
        });
        self.on_error = on_error;
    }

    /// A clone of `x` when the policy may dead-letter it (no cost otherwise).
    #[inline]
    fn keep<A: 'static>(&self, x: &A) -> Option<Kept<A>> {
        let k = self.keep.as_ref()?.downcast_ref::<Keeper<A>>()?;
        Some(Kept {
            rec: (k.clone)(x),
            json: k.json,
        })
    }

    /// Applies the policy to the error `e` an operator returned.
    #[cold]
    fn reject<A, X: Into<BoxError>>(
        &self,
        name: &Arc<str>,
        acc: &mut Local,
        e: X,
        kept: Option<Kept<A>>,
    ) -> Result<(), Halt> {
        if let OnError::Fail = self.on_error {
            return Err(op_error(name, e));
        }
        let message = e.into().to_string();
        let r = self.on_error.reject(
            name,
            message,
            || Bad::Record(kept.map_or(Value::Null, |k| (k.json)(&k.rec))),
            None,
            None,
            |m| Error::Operator {
                stage: name.to_string(),
                source: m.into(),
            },
        )?;
        Acc::count(acc, r);
        Ok(())
    }
}

impl<C, F> TryMap<C, F> {
    pub(crate) fn set_policy<A: serde::Serialize + Clone + Send + 'static>(
        &mut self,
        on_error: OnError,
    ) {
        self.policy.set::<A>(on_error);
    }
}

impl<C, F> TryFlatMap<C, F> {
    pub(crate) fn set_policy<A: serde::Serialize + Clone + Send + 'static>(
        &mut self,
        on_error: OnError,
    ) {
        self.policy.set::<A>(on_error);
    }
}

impl<T> sealed::Sealed for Identity<T> {}
impl<C, F> sealed::Sealed for Map<C, F> {}
impl<C, F> sealed::Sealed for TryMap<C, F> {}
impl<C, F> sealed::Sealed for Filter<C, F> {}
impl<C, F> sealed::Sealed for FlatMap<C, F> {}
impl<C, F> sealed::Sealed for TryFlatMap<C, F> {}
impl<C, F> sealed::Sealed for Inspect<C, F> {}
impl<C> sealed::Sealed for Limit<C> {}
impl<In, Out> sealed::Sealed for Boxed<In, Out> {}
impl<T> sealed::Sealed for MapPar<T> {}
impl<S, T> sealed::Sealed for Stripes<S, T> {}

/// The empty chain: emits its input unchanged.
#[derive(Debug)]
pub struct Identity<T>(PhantomData<fn(T) -> T>);

impl<T> Identity<T> {
    pub(crate) fn new() -> Self {
        Identity(PhantomData)
    }
}

impl<T> Clone for Identity<T> {
    fn clone(&self) -> Self {
        Identity(PhantomData)
    }
}

impl<T: Send + 'static> Chain<T> for Identity<T> {
    type Out = T;
    #[inline]
    fn push<E: Emit<T>>(&mut self, item: T, out: &mut E) -> Result<(), Halt> {
        out.emit(item)
    }
    fn names(&self, _: &mut Vec<Arc<str>>) {}
    fn rename_last(&mut self, _: Arc<str>) -> bool {
        false
    }
}

/// A run of consecutive records of a split source's data: what the head of a
/// [`source_split`](crate::Pipeline::source_split) stage reads, one batch's worth at a time. The
/// stage's chain starts with [`Stripes`], which hands its records on one by one.
pub struct Stripe<S> {
    data: Arc<S>,
    start: usize,
    end: usize,
}

impl<S> Stripe<S> {
    pub(crate) fn new(data: Arc<S>, start: usize, end: usize) -> Self {
        Stripe { data, start, end }
    }

    /// How many records it holds.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

impl<S> std::fmt::Debug for Stripe<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Stripe({}..{})", self.start, self.end)
    }
}

/// The start of a split source's chain: each [`Stripe`]'s records, cloned straight out of the
/// shared data into the operators that follow.
///
/// Why not a batch of records, as other sources fill: copying a batch out of the data is a
/// pass over memory of its own, which a loop over the data does not pay (on the peers'
/// window workload it was a fifth of the source thread's time, the read of the input from
/// memory done up front instead of under the per-record work). Here each record is read where
/// the operators use it.
///
/// It counts the records it handed on (for the accounts: the head's messages are stripes),
/// in a plain counter per record and once per batch in the stage's shared one.
pub struct Stripes<S, T> {
    pushed: u64,
    shared: Arc<crate::sync::AtomicU64>,
    _t: PhantomData<fn(&S) -> T>,
}

impl<S, T> Stripes<S, T> {
    pub(crate) fn new(shared: Arc<crate::sync::AtomicU64>) -> Self {
        Stripes {
            pushed: 0,
            shared,
            _t: PhantomData,
        }
    }
}

impl<S, T> Clone for Stripes<S, T> {
    fn clone(&self) -> Self {
        Stripes::new(Arc::clone(&self.shared))
    }
}

impl<S, T> std::fmt::Debug for Stripes<S, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Stripes")
    }
}

impl<S, T> Chain<Stripe<S>> for Stripes<S, T>
where
    S: AsRef<[T]> + Send + Sync + 'static,
    T: Clone + Send + 'static,
{
    type Out = T;
    #[inline]
    fn push<E: Emit<T>>(&mut self, item: Stripe<S>, out: &mut E) -> Result<(), Halt> {
        let records = &(*item.data).as_ref()[item.start..item.end];
        for (i, x) in records.iter().enumerate() {
            if let Err(h) = out.emit(x.clone()) {
                // The records after this one were read but not handed on: not counted.
                self.pushed += i as u64 + 1;
                return Err(h);
            }
        }
        self.pushed += records.len() as u64;
        Ok(())
    }
    fn end_batch(&mut self) {
        if self.pushed > 0 {
            self.shared
                .fetch_add(std::mem::take(&mut self.pushed), Ordering::Relaxed);
        }
    }
    fn names(&self, _: &mut Vec<Arc<str>>) {}
    fn rename_last(&mut self, _: Arc<str>) -> bool {
        false
    }
}

macro_rules! op_struct {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        pub struct $name<C, F> {
            prev: C,
            f: Arc<F>,
            name: Arc<str>,
            acc: Acc,
            policy: Policy,
        }
        impl<C, F> std::fmt::Debug for $name<C, F> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($name)).field("name", &self.name).finish_non_exhaustive()
            }
        }
        impl<C: Clone, F> Clone for $name<C, F> {
            fn clone(&self) -> Self {
                $name {
                    prev: self.prev.clone(),
                    f: Arc::clone(&self.f),
                    name: Arc::clone(&self.name),
                    acc: self.acc.clone(),
                    policy: self.policy.clone(),
                }
            }
        }
        impl<C, F> $name<C, F> {
            pub(crate) fn new(prev: C, f: F, name: Arc<str>) -> Self {
                $name { prev, f: Arc::new(f), name, acc: Acc::new(), policy: Policy::default() }
            }
        }
    };
}

op_struct!(
    /// `map`: applies a function to each record.
    Map
);
op_struct!(
    /// `try_map`: applies a fallible function; an error fails the run naming this operator.
    TryMap
);
op_struct!(
    /// `filter`: keeps the records for which a predicate holds.
    Filter
);
op_struct!(
    /// `flat_map`: turns each record into zero or more records.
    FlatMap
);
op_struct!(
    /// `try_flat_map`: a fallible `flat_map`.
    TryFlatMap
);
op_struct!(
    /// `inspect`: calls a function on each record and passes it on unchanged.
    Inspect
);

/// Adapter: the emitter a step hands to the step before it.
struct Step<'a, F, E> {
    f: &'a F,
    name: &'a Arc<str>,
    acc: &'a mut Local,
    policy: &'a Policy,
    out: &'a mut E,
}

/// Wraps an operator's error with the operator's name; an [`Error`] returned by the closure
/// (which already names its stage) passes through unchanged.
pub(crate) fn op_error(name: &str, e: impl Into<BoxError>) -> Halt {
    match e.into().downcast::<Error>() {
        Ok(err) => Halt::Failed(*err),
        Err(source) => Halt::Failed(Error::Operator {
            stage: name.to_string(),
            source,
        }),
    }
}

/// The checkpoint methods of a `Chain` impl for a stateless step with a `prev` field: they
/// forward to the steps before it (which may hold state, as a `limit` does).
macro_rules! forward_state {
    () => {
        fn state_support(
            &self,
            out: &mut Vec<(std::sync::Arc<str>, $crate::checkpoint::StateSupport)>,
        ) {
            self.prev.state_support(out)
        }
        fn snapshot(
            &self,
            state: &mut $crate::checkpoint::state::InstanceState,
        ) -> Result<(), $crate::Error> {
            self.prev.snapshot(state)
        }
        fn restore(
            &mut self,
            state: &$crate::checkpoint::state::InstanceState,
        ) -> Result<(), $crate::Error> {
            self.prev.restore(state)
        }
    };
}
pub(crate) use forward_state;

/// The naming methods of a `Chain` impl for an operator with `prev` and `name` fields.
macro_rules! named_step {
    ($shape:expr) => {
        named_step!(@names $shape);
        forward_state!();
    };
    (@names $shape:expr) => {
        #[inline]
        fn begin_batch(&mut self, records: usize) {
            self.prev.begin_batch(records);
        }
        #[inline]
        fn end_batch(&mut self) {
            self.prev.end_batch();
            self.acc.flush();
        }
        fn steps(&self, steps: &mut Vec<StepInfo>) {
            self.prev.steps(steps);
            steps.push(self.acc.info(&self.name, $shape));
        }
        fn names(&self, names: &mut Vec<Arc<str>>) {
            self.prev.names(names);
            names.push(Arc::clone(&self.name));
        }
        fn rename_last(&mut self, name: Arc<str>) -> bool {
            self.name = name;
            true
        }
    };
}

// The `Chain` impls are written out per operator: their trait bounds differ in shape, which a
// macro would obscure.

struct MapEmit<'a, F, E>(Step<'a, F, E>);
impl<A, U, F: Fn(A) -> U, E: Emit<U>> Emit<A> for MapEmit<'_, F, E> {
    #[inline]
    fn emit(&mut self, x: A) -> Result<(), Halt> {
        self.0.out.emit((self.0.f)(x))
    }
}
impl<In, C, U, F> Chain<In> for Map<C, F>
where
    C: Chain<In>,
    U: Send + 'static,
    F: Fn(C::Out) -> U + Send + Sync + 'static,
{
    type Out = U;
    #[inline]
    fn push<E: Emit<U>>(&mut self, item: In, out: &mut E) -> Result<(), Halt> {
        self.prev.push(
            item,
            &mut MapEmit(Step {
                f: &*self.f,
                name: &self.name,
                acc: &mut self.acc.local,
                policy: &self.policy,
                out,
            }),
        )
    }
    named_step!(Shape::OneToOne);
}

struct TryMapEmit<'a, F, E>(Step<'a, F, E>);
impl<A: 'static, U, X: Into<BoxError>, F: Fn(A) -> Result<U, X>, E: Emit<U>> Emit<A>
    for TryMapEmit<'_, F, E>
{
    #[inline]
    fn emit(&mut self, x: A) -> Result<(), Halt> {
        let kept = self.0.policy.keep(&x);
        match (self.0.f)(x) {
            Ok(u) => self.0.out.emit(u),
            Err(e) => self.0.policy.reject(self.0.name, self.0.acc, e, kept),
        }
    }
}
impl<In, C, U, X, F> Chain<In> for TryMap<C, F>
where
    C: Chain<In>,
    U: Send + 'static,
    X: Into<BoxError>,
    F: Fn(C::Out) -> Result<U, X> + Send + Sync + 'static,
{
    type Out = U;
    #[inline]
    fn push<E: Emit<U>>(&mut self, item: In, out: &mut E) -> Result<(), Halt> {
        self.prev.push(
            item,
            &mut TryMapEmit(Step {
                f: &*self.f,
                name: &self.name,
                acc: &mut self.acc.local,
                policy: &self.policy,
                out,
            }),
        )
    }
    named_step!(Shape::OneToOne);
}

struct FilterEmit<'a, F, E>(Step<'a, F, E>);
impl<A, F: Fn(&A) -> bool, E: Emit<A>> Emit<A> for FilterEmit<'_, F, E> {
    #[inline]
    fn emit(&mut self, x: A) -> Result<(), Halt> {
        if (self.0.f)(&x) {
            self.0.out.emit(x)
        } else {
            self.0.acc.filtered += 1;
            Ok(())
        }
    }
}
impl<In, C, F> Chain<In> for Filter<C, F>
where
    C: Chain<In>,
    F: Fn(&C::Out) -> bool + Send + Sync + 'static,
{
    type Out = C::Out;
    #[inline]
    fn push<E: Emit<C::Out>>(&mut self, item: In, out: &mut E) -> Result<(), Halt> {
        self.prev.push(
            item,
            &mut FilterEmit(Step {
                f: &*self.f,
                name: &self.name,
                acc: &mut self.acc.local,
                policy: &self.policy,
                out,
            }),
        )
    }
    named_step!(Shape::Filtering);
}

struct FlatMapEmit<'a, F, E>(Step<'a, F, E>);
impl<A, I: IntoIterator, F: Fn(A) -> I, E: Emit<I::Item>> Emit<A> for FlatMapEmit<'_, F, E> {
    #[inline]
    fn emit(&mut self, x: A) -> Result<(), Halt> {
        for u in (self.0.f)(x) {
            self.0.acc.out += 1;
            self.0.out.emit(u)?;
        }
        Ok(())
    }
}
impl<In, C, I, F> Chain<In> for FlatMap<C, F>
where
    C: Chain<In>,
    I: IntoIterator,
    I::Item: Send + 'static,
    F: Fn(C::Out) -> I + Send + Sync + 'static,
{
    type Out = I::Item;
    #[inline]
    fn push<E: Emit<I::Item>>(&mut self, item: In, out: &mut E) -> Result<(), Halt> {
        self.prev.push(
            item,
            &mut FlatMapEmit(Step {
                f: &*self.f,
                name: &self.name,
                acc: &mut self.acc.local,
                policy: &self.policy,
                out,
            }),
        )
    }
    named_step!(Shape::OneToMany);
}

struct TryFlatMapEmit<'a, F, E>(Step<'a, F, E>);
impl<
        A: 'static,
        I: IntoIterator,
        X: Into<BoxError>,
        F: Fn(A) -> Result<I, X>,
        E: Emit<I::Item>,
    > Emit<A> for TryFlatMapEmit<'_, F, E>
{
    #[inline]
    fn emit(&mut self, x: A) -> Result<(), Halt> {
        let kept = self.0.policy.keep(&x);
        match (self.0.f)(x) {
            Ok(items) => {
                for u in items {
                    self.0.acc.out += 1;
                    self.0.out.emit(u)?;
                }
                Ok(())
            }
            Err(e) => self.0.policy.reject(self.0.name, self.0.acc, e, kept),
        }
    }
}
impl<In, C, I, X, F> Chain<In> for TryFlatMap<C, F>
where
    C: Chain<In>,
    I: IntoIterator,
    I::Item: Send + 'static,
    X: Into<BoxError>,
    F: Fn(C::Out) -> Result<I, X> + Send + Sync + 'static,
{
    type Out = I::Item;
    #[inline]
    fn push<E: Emit<I::Item>>(&mut self, item: In, out: &mut E) -> Result<(), Halt> {
        self.prev.push(
            item,
            &mut TryFlatMapEmit(Step {
                f: &*self.f,
                name: &self.name,
                acc: &mut self.acc.local,
                policy: &self.policy,
                out,
            }),
        )
    }
    named_step!(Shape::OneToMany);
}

struct InspectEmit<'a, F, E>(Step<'a, F, E>);
impl<A, F: Fn(&A), E: Emit<A>> Emit<A> for InspectEmit<'_, F, E> {
    #[inline]
    fn emit(&mut self, x: A) -> Result<(), Halt> {
        (self.0.f)(&x);
        self.0.out.emit(x)
    }
}
impl<In, C, F> Chain<In> for Inspect<C, F>
where
    C: Chain<In>,
    F: Fn(&C::Out) + Send + Sync + 'static,
{
    type Out = C::Out;
    #[inline]
    fn push<E: Emit<C::Out>>(&mut self, item: In, out: &mut E) -> Result<(), Halt> {
        self.prev.push(
            item,
            &mut InspectEmit(Step {
                f: &*self.f,
                name: &self.name,
                acc: &mut self.acc.local,
                policy: &self.policy,
                out,
            }),
        )
    }
    named_step!(Shape::OneToOne);
}

/// `limit(n)`: passes the first `n` records (counted across all instances of the stage), then
/// stops the stage, which stops everything upstream of it.
///
/// Checkpointed: each instance snapshots how many records *it* passed (part `chain.<name>`);
/// a restore takes that many out of the stage's shared budget again, so that over all
/// restored instances the budget is what it was at the barrier.
pub struct Limit<C> {
    prev: C,
    remaining: Arc<AtomicU64>,
    name: Arc<str>,
    acc: Acc,
    /// Records this instance passed (a clone, which is a new instance, starts at 0).
    passed: u64,
}

impl<C> std::fmt::Debug for Limit<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limit")
            .field("name", &self.name)
            .field("remaining", &self.remaining.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<C: Clone> Clone for Limit<C> {
    fn clone(&self) -> Self {
        Limit {
            prev: self.prev.clone(),
            remaining: Arc::clone(&self.remaining),
            name: Arc::clone(&self.name),
            acc: self.acc.clone(),
            passed: 0,
        }
    }
}

impl<C> Limit<C> {
    pub(crate) fn new(prev: C, n: u64, name: Arc<str>) -> Self {
        Limit {
            prev,
            remaining: Arc::new(AtomicU64::new(n)),
            name,
            acc: Acc::new(),
            passed: 0,
        }
    }

    fn part(&self) -> String {
        format!("chain.{}", self.name)
    }
}

struct LimitEmit<'a, E> {
    remaining: &'a AtomicU64,
    acc: &'a mut Local,
    passed: &'a mut u64,
    out: &'a mut E,
}

impl<A, E: Emit<A>> Emit<A> for LimitEmit<'_, E> {
    #[inline]
    fn emit(&mut self, x: A) -> Result<(), Halt> {
        let before = self
            .remaining
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| r.checked_sub(1));
        match before {
            Err(_) => {
                self.acc.filtered += 1;
                Err(Halt::Done)
            }
            Ok(1) => {
                *self.passed += 1;
                self.out.emit(x)?;
                Err(Halt::Done)
            }
            Ok(_) => {
                *self.passed += 1;
                self.out.emit(x)
            }
        }
    }
}

impl<In, C: Chain<In>> Chain<In> for Limit<C> {
    type Out = C::Out;
    #[inline]
    fn push<E: Emit<C::Out>>(&mut self, item: In, out: &mut E) -> Result<(), Halt> {
        // No check before the chain: a record that reaches the limit after its n (another
        // instance took the last one) goes through the steps before it and is counted here as
        // filtered, so every step's account holds (see `runtime::drive_loop`).
        self.prev.push(
            item,
            &mut LimitEmit {
                remaining: &self.remaining,
                acc: &mut self.acc.local,
                passed: &mut self.passed,
                out,
            },
        )
    }
    named_step!(@names Shape::Filtering);
    fn state_support(&self, out: &mut Vec<(Arc<str>, crate::checkpoint::StateSupport)>) {
        self.prev.state_support(out);
        out.push((
            Arc::clone(&self.name),
            crate::checkpoint::StateSupport::Snapshots,
        ));
    }
    fn snapshot(&self, state: &mut crate::checkpoint::state::InstanceState) -> Result<(), Error> {
        self.prev.snapshot(state)?;
        state.put(&self.part(), &self.passed)
    }
    fn restore(&mut self, state: &crate::checkpoint::state::InstanceState) -> Result<(), Error> {
        self.prev.restore(state)?;
        let passed: u64 = state.get(&self.part())?.unwrap_or(0);
        self.passed = passed;
        // Take this instance's records out of the shared budget again (saturating: the
        // budget never goes below 0, as `emit` never takes past it).
        let _ = self
            .remaining
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
                Some(r.saturating_sub(passed))
            });
        Ok(())
    }
}

/// `map_par`: the step a [`Stream::map_par`](crate::Stream::map_par) adds. Its records were
/// mapped by the stage's head on the run's rayon pool (a batch at a time, in order); the step
/// itself passes them on, and holds the step's name and account (one record out per record
/// in).
pub struct MapPar<T> {
    name: Arc<str>,
    acc: Acc,
    out: PhantomData<fn(T) -> T>,
}

impl<T> std::fmt::Debug for MapPar<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapPar")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl<T> Clone for MapPar<T> {
    fn clone(&self) -> Self {
        MapPar {
            name: Arc::clone(&self.name),
            acc: self.acc.clone(),
            out: PhantomData,
        }
    }
}

impl<T> MapPar<T> {
    pub(crate) fn new(name: Arc<str>) -> Self {
        MapPar {
            name,
            acc: Acc::new(),
            out: PhantomData,
        }
    }
}

impl<T: Send + 'static> Chain<T> for MapPar<T> {
    type Out = T;
    #[inline]
    fn push<E: Emit<T>>(&mut self, item: T, out: &mut E) -> Result<(), Halt> {
        out.emit(item)
    }
    fn steps(&self, steps: &mut Vec<StepInfo>) {
        steps.push(self.acc.info(&self.name, Shape::OneToOne));
    }
    fn names(&self, names: &mut Vec<Arc<str>>) {
        names.push(Arc::clone(&self.name));
    }
    fn rename_last(&mut self, name: Arc<str>) -> bool {
        self.name = name;
        true
    }
}

/// The object-safe face of a chain, for pipelines assembled at run time (the TOML layer).
trait DynChain<In, Out>: Send {
    fn push_dyn(&mut self, item: In, out: &mut dyn Emit<Out>) -> Result<(), Halt>;
    fn clone_box(&self) -> Box<dyn DynChain<In, Out>>;
    fn names_dyn(&self, names: &mut Vec<Arc<str>>);
    fn rename_dyn(&mut self, name: Arc<str>) -> bool;
    fn begin_batch_dyn(&mut self, records: usize);
    fn end_batch_dyn(&mut self);
    fn steps_dyn(&self, steps: &mut Vec<StepInfo>);
    fn state_support_dyn(&self, out: &mut Vec<(Arc<str>, crate::checkpoint::StateSupport)>);
    fn snapshot_dyn(
        &self,
        state: &mut crate::checkpoint::state::InstanceState,
    ) -> Result<(), Error>;
    fn restore_dyn(&mut self, state: &crate::checkpoint::state::InstanceState)
        -> Result<(), Error>;
}

impl<In, C: Chain<In>> DynChain<In, C::Out> for C {
    fn push_dyn(&mut self, item: In, mut out: &mut dyn Emit<C::Out>) -> Result<(), Halt> {
        self.push(item, &mut out)
    }
    fn clone_box(&self) -> Box<dyn DynChain<In, C::Out>> {
        Box::new(self.clone())
    }
    fn names_dyn(&self, names: &mut Vec<Arc<str>>) {
        self.names(names)
    }
    fn rename_dyn(&mut self, name: Arc<str>) -> bool {
        self.rename_last(name)
    }
    fn begin_batch_dyn(&mut self, records: usize) {
        self.begin_batch(records)
    }
    fn end_batch_dyn(&mut self) {
        self.end_batch()
    }
    fn steps_dyn(&self, steps: &mut Vec<StepInfo>) {
        self.steps(steps)
    }
    fn state_support_dyn(&self, out: &mut Vec<(Arc<str>, crate::checkpoint::StateSupport)>) {
        self.state_support(out)
    }
    fn snapshot_dyn(
        &self,
        state: &mut crate::checkpoint::state::InstanceState,
    ) -> Result<(), Error> {
        self.snapshot(state)
    }
    fn restore_dyn(
        &mut self,
        state: &crate::checkpoint::state::InstanceState,
    ) -> Result<(), Error> {
        self.restore(state)
    }
}

/// A type-erased chain: one dynamic call per record, so that chains of different shapes have
/// one type. Made by [`Stream::boxed`](crate::Stream::boxed).
pub struct Boxed<In, Out>(Box<dyn DynChain<In, Out>>);

impl<In, Out> std::fmt::Debug for Boxed<In, Out> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names = Vec::new();
        self.0.names_dyn(&mut names);
        f.debug_tuple("Boxed").field(&names).finish()
    }
}

impl<In: 'static, Out: 'static> Boxed<In, Out> {
    pub(crate) fn new<C: Chain<In, Out = Out>>(chain: C) -> Self {
        Boxed(Box::new(chain))
    }
}

impl<In, Out> Clone for Boxed<In, Out> {
    fn clone(&self) -> Self {
        Boxed(self.0.clone_box())
    }
}

impl<In: 'static, Out: Send + 'static> Chain<In> for Boxed<In, Out> {
    type Out = Out;
    #[inline]
    fn push<E: Emit<Out>>(&mut self, item: In, out: &mut E) -> Result<(), Halt> {
        self.0.push_dyn(item, out)
    }
    fn names(&self, names: &mut Vec<Arc<str>>) {
        self.0.names_dyn(names)
    }
    fn rename_last(&mut self, name: Arc<str>) -> bool {
        self.0.rename_dyn(name)
    }
    fn begin_batch(&mut self, records: usize) {
        self.0.begin_batch_dyn(records)
    }
    fn end_batch(&mut self) {
        self.0.end_batch_dyn()
    }
    fn steps(&self, steps: &mut Vec<StepInfo>) {
        self.0.steps_dyn(steps)
    }
    fn state_support(&self, out: &mut Vec<(Arc<str>, crate::checkpoint::StateSupport)>) {
        self.0.state_support_dyn(out)
    }
    fn snapshot(&self, state: &mut crate::checkpoint::state::InstanceState) -> Result<(), Error> {
        self.0.snapshot_dyn(state)
    }
    fn restore(&mut self, state: &crate::checkpoint::state::InstanceState) -> Result<(), Error> {
        self.0.restore_dyn(state)
    }
}
