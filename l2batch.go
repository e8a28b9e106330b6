package imgcache

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
)

// Read batching.
//
// Under load a cache's Redis reads are bound by round trips, not by Redis: each GET costs the
// client and the server a system call to write and one to read, and the server answers one
// connection at a time. So on a single Redis (a *redis.Client: one node, or Sentinel's failover
// client) reads do not each take a round trip of their own once enough are under way. Up to
// readsInFlight reads go to Redis as they come, exactly as they would without batching: a serial or
// lightly concurrent caller sees one GET per read. A read that finds readsInFlight under way
// queues, even if the pool has idle connections; when one of those round trips ends, the reads
// queued meanwhile (up to maxReadBatch) go in one MGET, sent by one of them and answered to each.
// A queued read waits for a round trip already under way, so batching starts no goroutine: its
// waits end on the clock ticks that every Redis call's deadline uses (deadline.go).
//
// Measured on the 2-core reference machine (README, Performance): 64 goroutines reading 200-byte
// values through Get spend about a quarter of the time per read that they do with a GET each, and
// 16 goroutines about half.
//
// A Cluster or a Ring is not batched: its reads go to several nodes, and a cap shared by all of
// them would let one slow node hold up the reads of the healthy ones.
//
// Deadlines. A queued read keeps its caller's context and the L2Timeout budget counted from when
// it queued: it gives up at the earlier of the two, whatever its batch is doing. The batch is sent
// by the read that would wait longest, under that read's deadline, so that no read waits past its
// own; a read that gives up while its batch is in flight gets its own error at once, and the batch
// goes on for the others; such a read made no call of its own, and is not counted in L2Errors
// (leftQueue). The sender itself, like the caller of a lone read, returns when the call ends even
// if its caller leaves during it (a cancellation does not cut a Redis call short; see deadline.go);
// a batch whose every read has given up, or whose deadlines have all passed, is not sent. A batch
// is one Redis call to the breaker (one observation, and one skip when the breaker is open); a
// batch that fails fails every read in it, each counted in L2Errors as its caller's read.

const (
	// readsInFlight is how many reads go to Redis without waiting for another to end. 4 lets two
	// cores keep Redis busy without batching at low concurrency; 1 halves throughput at two
	// goroutines, and more leaves round trips unfilled at high concurrency.
	readsInFlight = 4
	// maxReadBatch bounds the reads sent in one round trip, and so the size of one reply.
	maxReadBatch = 64
)

// readBatcher counts a l2's reads in flight and queues the ones that wait for a batch.
type readBatcher struct {
	mu       sync.Mutex
	inflight int            // round trips of reads under way, batches included
	queue    []*pendingRead // reads waiting for a round trip to end
	batched  atomic.Uint64  // reads sent in a batch of more than one (Stats.L2Batched)
}

// readReply is what one read found: each key's value, and whether the key exists.
type readReply struct {
	val [2]string
	ok  [2]bool
}

// pendingRead is a queued read.
type pendingRead struct {
	ctx      context.Context
	keys     [2]string
	n        int   // keys read: 1 or 2
	deadline int64 // preciseNow reading: when the read gives up

	// ready is signalled once: when reply and err are set, or when this read must send batch.
	ready chan struct{}
	batch []*pendingRead // set, under readBatcher.mu, for the read that sends its batch
	taken bool           // under readBatcher.mu: the read is in a batch and no longer queued
	left  bool           // under readBatcher.mu: the read has given up

	reply readReply
	err   error
}

// read reads key, and genKey unless it is "" (an entity's generation, read with the value), in one
// round trip, batched with other reads on a single Redis when readsInFlight are under way. An
// absent key is not an error: its ok is false.
func (l *l2) read(ctx context.Context, key, genKey string) (readReply, error) {
	if !l.oneNode() {
		return l.readAlone(ctx, key, genKey)
	}
	b := &l.reads
	b.mu.Lock()
	if b.inflight < readsInFlight {
		b.inflight++
		b.mu.Unlock()
		defer l.readDone()
		return l.readAlone(ctx, key, genKey)
	}
	if err := ctx.Err(); err != nil {
		b.mu.Unlock()
		return readReply{}, &leftQueue{err} // the caller has left: do not queue, as call would not ask
	}
	p := &pendingRead{ctx: ctx, keys: [2]string{key, genKey}, n: 1, ready: make(chan struct{}, 1)}
	if genKey != "" {
		p.n = 2
	}
	p.deadline = preciseNow() + int64(l.timeout)
	if dl, ok := ctx.Deadline(); ok {
		p.deadline = min(p.deadline, int64(dl.Sub(clockEpoch)))
	}
	b.queue = append(b.queue, p)
	b.mu.Unlock()
	return l.await(p)
}

// readAlone reads key (and genKey) in a round trip of its own: GET, or MGET of both keys on a
// single Redis, a pipeline of two GETs elsewhere (the keys are in different slots).
func (l *l2) readAlone(ctx context.Context, key, genKey string) (r readReply, err error) {
	if genKey == "" {
		err = l.call(ctx, func(ctx context.Context) error {
			cmd := redis.NewStringCmd(ctx, "get", key)
			gerr := l.processRead(ctx, cmd)
			r.val[0], r.ok[0] = cmd.Val(), gerr == nil
			return pipelineErr(gerr) // an absent key is a reply
		})
		return r, err
	}
	if l.oneNode() {
		err = l.call(ctx, func(ctx context.Context) error {
			cmd := redis.NewSliceCmd(ctx, "mget", key, genKey)
			err := l.processRead(ctx, cmd)
			res := cmd.Val()
			if err == nil && len(res) == 2 {
				r.val[0], r.ok[0] = res[0].(string)
				r.val[1], r.ok[1] = res[1].(string)
			}
			return err
		})
		return r, err
	}
	var a, g *redis.StringCmd
	err = l.call(ctx, func(ctx context.Context) error {
		_, err := l.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
			a, g = p.Get(ctx, key), p.Get(ctx, genKey)
			return nil
		})
		return firstFailure(err, a, g)
	})
	if err == nil {
		r.val[0], r.ok[0] = stringReply(a)
		r.val[1], r.ok[1] = stringReply(g)
	}
	return r, err
}

// firstFailure returns the error of a pipeline of cmds, err being what go-redis returned: the first
// command's error that is not an absent key's, else the pipeline's own (nil for redis.Nil).
// go-redis returns the first failed command's error, which may be an absent key's redis.Nil while
// a later command, on another node, failed.
func firstFailure(err error, cmds ...redis.Cmder) error {
	if err == nil {
		return nil
	}
	for _, c := range cmds {
		if cerr := c.Err(); cerr != nil && !errors.Is(cerr, redis.Nil) {
			return cerr
		}
	}
	return pipelineErr(err)
}

// stringReply returns a GET's value, ok false when the key is absent.
func stringReply(cmd *redis.StringCmd) (string, bool) {
	s, err := cmd.Result()
	return s, err == nil
}

// await waits for a queued read's reply: from the batch it joins, or from the Redis call it sends
// when it is chosen to. It gives up at its deadline or when its caller's context ends.
func (l *l2) await(p *pendingRead) (readReply, error) {
	var expired <-chan struct{}
	if t := deadlineTicks.get(p.deadline); t != nil {
		expired = t.done
	} else { // every Cache is closed: no clock goroutine closes ticks
		ctx, cancel := context.WithDeadline(context.Background(), clockEpoch.Add(time.Duration(p.deadline)))
		defer cancel()
		expired = ctx.Done()
	}
	var err error
	select {
	case <-p.ready:
	case <-p.ctx.Done():
		err = p.ctx.Err()
	case <-expired:
		err = context.DeadlineExceeded
	}
	if err != nil {
		if !l.reads.leave(p) {
			// The batch answers no one for p: ready has room for its signal.
			return readReply{}, &leftQueue{err}
		}
		<-p.ready // p sends its batch: the others wait for it
	}
	if p.batch != nil {
		l.sendBatch(p, err != nil)
	}
	if err != nil {
		return readReply{}, &leftQueue{err}
	}
	return p.reply, p.err
}

// leftQueue is the error of a read that gave up before a Redis call was made for it, or while a
// batch it was in was in flight: its caller left or its deadline passed, and Redis is not at fault
// (it is not counted in Stats.L2Errors).
type leftQueue struct{ err error }

func (e *leftQueue) Error() string { return e.err.Error() }
func (e *leftQueue) Unwrap() error { return e.err }

// leave takes a read that gives up out of the queue. It reports whether the read must stay: it
// has been chosen to send its batch.
func (b *readBatcher) leave(p *pendingRead) (mustSend bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !p.taken {
		for i, q := range b.queue {
			if q == p {
				b.queue = append(b.queue[:i], b.queue[i+1:]...)
				break
			}
		}
		return false
	}
	p.left = true
	return p.batch != nil
}

// readDone ends a round trip of reads. If reads queued meanwhile, the round trip's place passes to
// them: they go as one batch.
func (l *l2) readDone() {
	l.reads.mu.Lock()
	lead := l.reads.next()
	l.reads.mu.Unlock()
	if lead != nil {
		lead.ready <- struct{}{}
	}
}

// next ends a round trip, under mu. It returns nil, or the read that sends the batch taking the
// round trip's place, which its caller must signal: the one whose deadline is the latest.
func (b *readBatcher) next() *pendingRead {
	if len(b.queue) == 0 {
		b.inflight--
		return nil
	}
	var batch []*pendingRead
	if len(b.queue) <= maxReadBatch {
		batch, b.queue = b.queue, nil
	} else {
		batch = b.queue[:maxReadBatch:maxReadBatch]
		b.queue = append([]*pendingRead(nil), b.queue[maxReadBatch:]...)
	}
	lead := batch[0]
	for _, p := range batch {
		p.taken = true
		if p.deadline > lead.deadline {
			lead = p
		}
	}
	lead.batch = batch
	return lead
}

// allLeft reports whether every read of batch has given up.
func (b *readBatcher) allLeft(batch []*pendingRead) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, p := range batch {
		if !p.left {
			return false
		}
	}
	return true
}

// errBatchAborted answers the reads of a batch whose sender did not finish (a panic in a hook).
var errBatchAborted = errors.New("imgcache: batched Redis read abandoned by its sender")

// sendBatch sends lead's batch as one MGET and answers every read in it, lead's included. The call
// runs under lead's context values and its deadline, the latest in the batch, without lead's
// cancellation: lead leaving must not fail the others.
func (l *l2) sendBatch(lead *pendingRead, leadLeft bool) {
	batch := lead.batch
	answered := 0
	var abort error = errBatchAborted // for the reads not answered when sendBatch returns
	defer func() {
		for _, p := range batch[answered:] {
			p.err = abort
			p.ready <- struct{}{}
		}
		l.readDone()
	}()
	// No call for nobody, and none past every deadline in the batch (lead's is the latest).
	if leadLeft && l.reads.allLeft(batch) {
		abort = context.Canceled // no one reads it
		return
	}
	if preciseNow() >= lead.deadline {
		abort = &leftQueue{context.DeadlineExceeded}
		return
	}
	ctx := newCallCtx(context.WithoutCancel(lead.ctx), lead.deadline)
	if ctx == nil { // every Cache is closed: no clock goroutine would end the call's waits
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(context.WithoutCancel(lead.ctx), clockEpoch.Add(time.Duration(lead.deadline)))
		defer cancel()
	}
	if len(batch) == 1 {
		lead.reply, lead.err = l.readAlone(ctx, lead.keys[0], lead.keys[1])
		answered = 1 // lead's ready already carried its turn to send
		return
	}
	args := make([]any, 1, 1+2*len(batch))
	args[0] = "mget"
	for _, p := range batch {
		for _, k := range p.keys[:p.n] {
			args = append(args, k)
		}
	}
	var res []any
	err := l.call(ctx, func(ctx context.Context) (err error) {
		// Counted here: a batch that the open breaker or a leaving lead keeps from Redis shares no
		// round trip.
		l.reads.batched.Add(uint64(len(batch)))
		cmd := redis.NewSliceCmd(ctx, args...)
		err = l.processRead(ctx, cmd)
		res = cmd.Val()
		return err
	})
	if err == nil && len(res) != len(args)-1 {
		err = errors.New("imgcache: MGET answered a different number of keys")
	}
	i := 0
	for _, p := range batch {
		if p.err = err; err == nil {
			for j := range p.n {
				p.reply.val[j], p.reply.ok[j] = res[i+j].(string)
			}
		}
		i += p.n
	}
	for _, p := range batch {
		answered++
		if p != lead {
			p.ready <- struct{}{}
		}
	}
}
