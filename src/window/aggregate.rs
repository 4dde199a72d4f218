//! Aggregations over a window's records: the [`Aggregate`] trait and the built-ins.

/// An aggregation: an accumulator created per window, fed each record, merged with another
/// (session windows merge when they overlap) and turned into a result.
pub trait Aggregate<T>: Send + Sync + 'static {
    /// The running state of one window.
    type Acc: Clone + Send;
    /// What a window emits.
    type Out: Clone + Send;
    /// A fresh accumulator.
    fn create(&self) -> Self::Acc;
    /// Adds one record.
    fn add(&self, acc: &mut Self::Acc, value: &T);
    /// Adds everything `other` accumulated.
    fn merge(&self, acc: &mut Self::Acc, other: Self::Acc);
    /// The current result.
    fn result(&self, acc: &Self::Acc) -> Self::Out;

    /// This aggregate over a value read from each record: `Sum.on(|e: &Event| e.amount)`.
    fn on<U, F>(self, f: F) -> On<Self, F>
    where
        Self: Sized,
        F: Fn(&U) -> T + Send + Sync + 'static,
    {
        On { agg: self, f }
    }
}

/// An aggregate over a value read from each record (see [`Aggregate::on`]).
#[derive(Debug, Clone, Copy)]
pub struct On<A, F> {
    agg: A,
    f: F,
}

impl<T, U, A, F> Aggregate<U> for On<A, F>
where
    A: Aggregate<T>,
    F: Fn(&U) -> T + Send + Sync + 'static,
{
    type Acc = A::Acc;
    type Out = A::Out;
    #[inline]
    fn create(&self) -> Self::Acc {
        self.agg.create()
    }
    #[inline]
    fn add(&self, acc: &mut Self::Acc, value: &U) {
        self.agg.add(acc, &(self.f)(value))
    }
    #[inline]
    fn merge(&self, acc: &mut Self::Acc, other: Self::Acc) {
        self.agg.merge(acc, other)
    }
    #[inline]
    fn result(&self, acc: &Self::Acc) -> Self::Out {
        self.agg.result(acc)
    }
}

/// Counts records.
#[derive(Debug, Clone, Copy, Default)]
pub struct Count;

impl<T> Aggregate<T> for Count {
    type Acc = u64;
    type Out = u64;
    fn create(&self) -> u64 {
        0
    }
    fn add(&self, acc: &mut u64, _: &T) {
        *acc += 1;
    }
    fn merge(&self, acc: &mut u64, other: u64) {
        *acc += other;
    }
    fn result(&self, acc: &u64) -> u64 {
        *acc
    }
}

/// Sums `f64` values.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sum;

impl Aggregate<f64> for Sum {
    type Acc = f64;
    type Out = f64;
    fn create(&self) -> f64 {
        0.0
    }
    fn add(&self, acc: &mut f64, v: &f64) {
        *acc += v;
    }
    fn merge(&self, acc: &mut f64, other: f64) {
        *acc += other;
    }
    fn result(&self, acc: &f64) -> f64 {
        *acc
    }
}

/// `Min` and `Max`: the extreme `f64` value by `pick` (`None` for an empty window).
macro_rules! extremum {
    ($(#[$doc:meta])* $name:ident, $pick:path) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, Default)]
        pub struct $name;

        impl Aggregate<f64> for $name {
            type Acc = Option<f64>;
            type Out = Option<f64>;
            fn create(&self) -> Option<f64> {
                None
            }
            fn add(&self, acc: &mut Option<f64>, v: &f64) {
                *acc = Some(acc.map_or(*v, |a| $pick(a, *v)));
            }
            fn merge(&self, acc: &mut Option<f64>, other: Option<f64>) {
                if let Some(o) = other {
                    self.add(acc, &o);
                }
            }
            fn result(&self, acc: &Option<f64>) -> Option<f64> {
                *acc
            }
        }
    };
}

extremum!(
    /// The smallest `f64` value (`None` for an empty window).
    Min,
    f64::min
);
extremum!(
    /// The largest `f64` value (`None` for an empty window).
    Max,
    f64::max
);

/// The mean of `f64` values (`None` for an empty window).
#[derive(Debug, Clone, Copy, Default)]
pub struct Mean;

impl Aggregate<f64> for Mean {
    type Acc = (f64, u64);
    type Out = Option<f64>;
    fn create(&self) -> (f64, u64) {
        (0.0, 0)
    }
    fn add(&self, acc: &mut (f64, u64), v: &f64) {
        acc.0 += v;
        acc.1 += 1;
    }
    fn merge(&self, acc: &mut (f64, u64), other: (f64, u64)) {
        acc.0 += other.0;
        acc.1 += other.1;
    }
    fn result(&self, acc: &(f64, u64)) -> Option<f64> {
        (acc.1 > 0).then(|| acc.0 / acc.1 as f64)
    }
}

/// A shared aggregate is one: each window stage instance holds a clone of the `Arc`.
impl<T, A: Aggregate<T>> Aggregate<T> for std::sync::Arc<A> {
    type Acc = A::Acc;
    type Out = A::Out;
    #[inline]
    fn create(&self) -> Self::Acc {
        (**self).create()
    }
    #[inline]
    fn add(&self, acc: &mut Self::Acc, value: &T) {
        (**self).add(acc, value)
    }
    #[inline]
    fn merge(&self, acc: &mut Self::Acc, other: Self::Acc) {
        (**self).merge(acc, other)
    }
    #[inline]
    fn result(&self, acc: &Self::Acc) -> Self::Out {
        (**self).result(acc)
    }
}
