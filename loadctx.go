package imgcache

import (
	"context"
	"time"
)

// loadContext is the context a load runs under: the values of the caller that started it, no
// deadline, and the cancellation of the Cache's base context, which Close cancels. It replaces
// context.WithCancel plus context.AfterFunc(base, cancel) per load, which cost about 0.8 us of a
// 1.9 us miss served from L1 alone (a registration in the base context's map under its lock, a
// cancel and an unregistration). A context derived from it (a loader's own WithTimeout, say) is tied
// to the base context through AfterFunc, which the context package calls instead of starting a
// goroutine to watch Done.
type loadContext struct {
	values context.Context // the caller's, never cancelled (see detached)
	base   context.Context
}

// detached returns a loadContext for a caller's ctx.
func detached(ctx, base context.Context) context.Context {
	if _, ok := ctx.Deadline(); ok || ctx.Done() != nil {
		// Keep only the values: a caller's cancelCtx must not be found by Value(&cancelCtxKey).
		ctx = context.WithoutCancel(ctx)
	}
	return loadContext{values: ctx, base: base}
}

func (c loadContext) Deadline() (time.Time, bool)    { return time.Time{}, false }
func (c loadContext) Done() <-chan struct{}          { return c.base.Done() }
func (c loadContext) Err() error                     { return c.base.Err() }
func (c loadContext) Value(key any) any              { return c.values.Value(key) }
func (c loadContext) AfterFunc(f func()) func() bool { return context.AfterFunc(c.base, f) }
func (c loadContext) String() string                 { return "imgcache load context" }
