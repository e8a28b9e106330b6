package imgcache

import (
	"context"
	"sync"
	"time"
)

// loadCtx is the context of a flight (GetOrLoad's load, or GetOrLoadMany's, and the Redis calls
// around it): its first caller's values, no deadline, and an end, when the flight ends or when
// Close cancels the Cache's base context, whichever comes first.
//
// context.WithCancel with context.AfterFunc on base gives the same ends, at a cost every miss
// would pay: three allocations, and an insertion into base's set of children and a removal from
// it, under the one mutex that every flight of the Cache shares. That was a third of an
// in-process miss's time. A loadCtx makes that machinery only when something asks for its Done
// channel: a loader that derives a context from it (a timeout, a tracer's span) or waits on it, or
// Options.LoadTimeout. A loader that never looks costs one allocation and an uncontended lock.
type loadCtx struct {
	values context.Context // the caller's, without its cancellation: for Value
	base   context.Context // the Cache's: Close cancels it

	mu     sync.Mutex
	ended  bool               // the flight has ended
	inner  context.Context    // made by the first Done: values, cancelled at the end or with base
	cancel context.CancelFunc // inner's
	stop   func() bool        // removes inner's cancellation from base's children
}

// newLoadCtx returns a flight's context with values' values; values must not carry its caller's
// cancellation or deadline (context.WithoutCancel).
func newLoadCtx(values, base context.Context) *loadCtx {
	c := new(loadCtx)
	c.init(values, base)
	return c
}

// init makes a zero loadCtx newLoadCtx's.
func (c *loadCtx) init(values, base context.Context) { c.values, c.base = values, base }

// Deadline reports none: a flight outlives its callers' deadlines (LoadTimeout bounds a load).
func (c *loadCtx) Deadline() (time.Time, bool) { return time.Time{}, false }

// Done returns a channel closed when the flight ends or the Cache is closed.
func (c *loadCtx) Done() <-chan struct{} { return c.activate().Done() }

// activate returns the context that Done's channel and derived contexts hang on, made on the
// first call.
func (c *loadCtx) activate() context.Context {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.inner == nil {
		c.inner, c.cancel = context.WithCancel(c.values)
		if c.ended || c.base.Err() != nil {
			c.cancel() // at once: Err has already reported the end
		} else {
			c.stop = context.AfterFunc(c.base, c.cancel)
		}
	}
	return c.inner
}

// Err returns context.Canceled once the flight has ended or the Cache is closed, nil before.
func (c *loadCtx) Err() error {
	c.mu.Lock()
	inner, ended := c.inner, c.ended
	c.mu.Unlock()
	if inner != nil {
		if err := inner.Err(); err != nil {
			return err
		}
	} else if ended {
		return context.Canceled
	}
	if c.base.Err() == nil {
		return nil
	}
	// Closed. The inner context's AfterFunc may not have run yet: end it now, so that Err never
	// goes back to nil and Done agrees with it.
	c.end()
	return context.Canceled
}

// Value returns the caller's values. Once Done has been asked for, it asks the inner context,
// which answers the context package's own lookup of a parent to cancel with it: contexts derived
// from a loadCtx are then cancelled with it directly, with no goroutine to watch it.
func (c *loadCtx) Value(key any) any {
	c.mu.Lock()
	inner := c.inner
	c.mu.Unlock()
	if inner != nil {
		return inner.Value(key)
	}
	return c.values.Value(key)
}

func (c *loadCtx) String() string { return "imgcache.loadCtx" }

// end ends the flight's context, and every context derived from it.
func (c *loadCtx) end() {
	c.mu.Lock()
	c.ended = true
	stop, cancel := c.stop, c.cancel
	c.stop, c.cancel = nil, nil
	c.mu.Unlock()
	if stop != nil {
		stop()
	}
	if cancel != nil {
		cancel()
	}
}
