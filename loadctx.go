package imgcache

import (
	"context"
	"time"
)

// loadContext is the parent of a load's context: the values of the caller that started the load,
// no deadline, and the cancellation of the Cache's base context, which Close cancels.
//
// detached puts a cancelCtx on top, which the load's end cancels. Because loadContext answers the
// context package's lookup of the nearest cancelCtx with base's (see Value), that cancelCtx
// registers with base directly, as a child of a cancelCtx does: no goroutine watches it, and no
// AfterFunc is needed. The former scheme, context.WithCancel plus context.AfterFunc(base, cancel)
// per load, cost about 0.8 us of a 1.9 us miss served from L1 alone. Contexts the loader derives,
// through any chain of values, find the load's cancelCtx the same way, and end with the load.
type loadContext struct {
	values context.Context // the caller's, never cancelled (see detached)
	base   context.Context
}

func (c loadContext) Deadline() (time.Time, bool) { return time.Time{}, false }
func (c loadContext) Done() <-chan struct{}       { return c.base.Done() }
func (c loadContext) Err() error                  { return c.base.Err() }
func (c loadContext) String() string              { return "imgcache load context" }

// Value looks in the caller's values, then in base's. base holds none of a caller's: what it
// answers is the context package's own lookup of the nearest cancelCtx, whose Done is this
// context's.
func (c loadContext) Value(key any) any {
	if v := c.values.Value(key); v != nil {
		return v
	}
	return c.base.Value(key)
}

// detached returns the context a load started by a caller with ctx runs under, and the cancel that
// ends it when the load is done. base must be the Cache's base context (a context.WithCancel).
func detached(ctx, base context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok || ctx.Done() != nil {
		// Keep only the values: the caller's own cancelCtx must not be found by the lookup above.
		ctx = context.WithoutCancel(ctx)
	}
	return context.WithCancel(loadContext{values: ctx, base: base})
}
