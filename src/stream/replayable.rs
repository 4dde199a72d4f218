//! [`Pipeline::replayable_source`]: a source stage over a user's [`Replayable`].

use crate::runtime::Head;
use crate::source::{ReplayHead, Replayable};

use super::{Fresh, Pipeline};

impl Pipeline {
    /// A source stage named `name` reading a [`Replayable`] source, on one thread: unlike
    /// [`source`](Pipeline::source) (an iterator, which cannot be replayed) it can be
    /// checkpointed — each checkpoint stores its position, and a resumed run seeks there.
    ///
    /// # Examples
    ///
    /// ```
    /// let p = millrace::Pipeline::new();
    /// let out = p.replayable_source("n", 0..3u64).map(|x| x * 10).collect();
    /// p.run().unwrap();
    /// assert_eq!(out.take(), vec![0, 10, 20]);
    /// ```
    pub fn replayable_source<R: Replayable>(&self, name: &str, src: R) -> Fresh<R::Item> {
        self.source_stage(name, move |_| {
            Ok(Box::new(ReplayHead::new(src)) as Box<dyn Head<R::Item>>)
        })
    }
}
