// Command rategen is the bench's open-loop load generator for fixed-rate latency: it sends unary
// gRPC calls to envoy.service.auth.v3.Authorization/Check over HTTP/2 cleartext at a fixed rate,
// request i at start + i/rate whether or not earlier calls have been answered, and measures each
// call from its scheduled send time to its trailers, so a stalled server's queue is counted
// (no coordinated omission). It reads ghz's binary data file and prints one JSON report.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math"
	"net"
	"os"
	"slices"
	"strconv"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2/hpack"
)

const checkPath = "/envoy.service.auth.v3.Authorization/Check"

// runner holds what every connection shares: the run's clock and the count in flight.
type runner struct {
	base     time.Time
	inflight atomic.Int64
	// freed wakes a closed-loop sender when calls end (one pending wake-up at most).
	freed chan struct{}
}

func newRunner() *runner {
	return &runner{base: time.Now(), freed: make(chan struct{}, 1)}
}

// release counts n calls as no longer in flight and wakes a closed-loop sender.
func (r *runner) release(n int64) {
	r.inflight.Add(-n)
	select {
	case r.freed <- struct{}{}:
	default:
	}
}

// now is nanoseconds since the run's base, on the monotonic clock.
func (r *runner) now() int64 { return int64(time.Since(r.base)) }

type options struct {
	port        int
	data        string
	rate        float64
	duration    float64
	connections int
	maxInflight int64
	concurrency int64
	requests    int64
	timeout     time.Duration
}

func parseOptions(args []string) (options, error) {
	var o options
	fs := flag.NewFlagSet("rategen", flag.ContinueOnError)
	fs.IntVar(&o.port, "port", 0, "gRPC port on 127.0.0.1")
	fs.StringVar(&o.data, "data", "", "ghz binary data file: size-delimited CheckRequests, sent round-robin")
	fs.Float64Var(&o.rate, "rate", 0, "requests a second, open loop")
	fs.Int64Var(&o.concurrency, "concurrency", 0, "closed loop instead of -rate: keep this many calls in flight, each sent as soon as another ends (saturation)")
	fs.Int64Var(&o.requests, "requests", 0, "closed loop: send at most this many calls (0: as many as -duration allows)")
	fs.Float64Var(&o.duration, "duration", 5, "seconds of sending")
	fs.IntVar(&o.connections, "connections", 2, "HTTP/2 connections; requests go round-robin")
	fs.Int64Var(&o.maxInflight, "max-inflight", 1_000_000, "requests in flight at most; beyond it a request is dropped (counted, not sent)")
	fs.DurationVar(&o.timeout, "timeout", 10*time.Second, "per request, from its scheduled send time")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	switch {
	case fs.NArg() > 0:
		return o, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	case o.port < 1 || o.port > 65535:
		return o, errors.New("-port: must be 1 to 65535")
	case o.data == "":
		return o, errors.New("-data: a data file is required")
	case o.concurrency < 0:
		return o, errors.New("-concurrency: must be at least 1")
	case o.requests < 0:
		return o, errors.New("-requests: must be 0 (no limit) or more")
	case o.requests > 0 && o.concurrency == 0:
		return o, errors.New("-requests: only with -concurrency (the open loop sends -rate x -duration)")
	case o.concurrency > 0 && o.rate != 0:
		return o, errors.New("-rate and -concurrency: give one, not both (open or closed loop)")
	case o.concurrency == 0 && (!(o.rate > 0) || math.IsInf(o.rate, 0)):
		return o, errors.New("-rate: must be above 0")
	case !(o.duration > 0) || math.IsInf(o.duration, 0):
		return o, errors.New("-duration: must be above 0")
	case o.connections < 1:
		return o, errors.New("-connections: must be at least 1")
	case o.maxInflight < 1:
		return o, errors.New("-max-inflight: must be at least 1")
	case o.timeout <= 0:
		return o, errors.New("-timeout: must be above 0")
	}
	return o, nil
}

// headerBlock encodes the request headers once. With the encoder's dynamic table at size 0 every
// field is a static-table index or a literal without indexing, so the block leaves the server's
// HPACK table untouched and the same bytes can open every stream of every connection.
func headerBlock(authority string) []byte {
	var buf bytesBuffer
	enc := hpack.NewEncoder(&buf)
	enc.SetMaxDynamicTableSizeLimit(0)
	for _, f := range []hpack.HeaderField{
		{Name: ":method", Value: "POST"},
		{Name: ":scheme", Value: "http"},
		{Name: ":authority", Value: authority},
		{Name: ":path", Value: checkPath},
		{Name: "content-type", Value: "application/grpc"},
		{Name: "te", Value: "trailers"},
		{Name: "user-agent", Value: "keygate-rategen"},
	} {
		// Writes to a bytesBuffer cannot fail.
		_ = enc.WriteField(f)
	}
	// The encoder opens with a table size update to 0 (one byte, 0x20): the server's table is
	// never used, so the update is left out rather than repeated on every stream.
	if len(buf) > 0 && buf[0] == 0x20 {
		return buf[1:]
	}
	return buf
}

type bytesBuffer []byte

func (b *bytesBuffer) Write(p []byte) (int, error) {
	*b = append(*b, p...)
	return len(p), nil
}

func main() {
	o, err := parseOptions(os.Args[1:])
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "rategen: %v\n", err)
		os.Exit(2)
	}
	rep, err := run(o)
	if err != nil {
		fmt.Fprintf(os.Stderr, "rategen: %v\n", err)
		os.Exit(1)
	}
	out, err := json.Marshal(rep)
	if err != nil {
		fmt.Fprintf(os.Stderr, "rategen: %v\n", err)
		os.Exit(1)
	}
	fmt.Println(string(out))
}

func run(o options) (report, error) {
	frames, err := loadFrames(o.data)
	if err != nil {
		return report{}, fmt.Errorf("-data: %s: %w", o.data, err)
	}
	// The outcome lists' first capacity: the open loop's whole schedule; the closed loop grows them.
	expected := int64(math.Round(o.rate * o.duration))
	if o.concurrency > 0 {
		expected = 100_000
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(o.port))
	block := headerBlock(addr)
	r := newRunner()
	capacity := int(max(expected, 1)/int64(o.connections)) + 16
	conns := make([]*conn, 0, o.connections)
	defer func() {
		for _, c := range conns {
			c.close()
		}
	}()
	for range o.connections {
		c, err := dial(r, addr, block, capacity)
		if err != nil {
			return report{}, fmt.Errorf("connecting to %s: %w", addr, err)
		}
		conns = append(conns, c)
	}
	// The clock starts once every connection has the server's SETTINGS: setup is not measured.
	for _, c := range conns {
		select {
		case <-c.ready:
		case <-time.After(10 * time.Second):
			return report{}, fmt.Errorf("%s sent no HTTP/2 SETTINGS within 10 s (is it an HTTP/2 cleartext gRPC server?)", addr)
		}
	}
	var s sent
	timer := "none (closed loop)"
	if o.concurrency > 0 {
		r.base = time.Now()
		stopSweep := sweep(r, conns, o.timeout)
		s = closedLoop(o, r, conns, frames)
		waitForAnswers(r, s.end, o.timeout)
		stopSweep()
	} else {
		w, err := newWaiter()
		if err != nil {
			return report{}, err
		}
		timer = w.name()
		r.base = time.Now()
		if err := w.start(r.base); err != nil {
			return report{}, err
		}
		stopSweep := sweep(r, conns, o.timeout)
		s, err = openLoop(o, r, conns, frames, w)
		if err != nil {
			stopSweep()
			return report{}, err
		}
		waitForAnswers(r, s.planned, o.timeout)
		stopSweep()
	}
	results := make([]outcomes, 0, len(conns))
	for _, c := range conns {
		results = append(results, c.close())
	}
	conns = nil
	return summarize(o, s, timer, results), nil
}

// sent is what a sending loop did: calls scheduled and dropped, when sending ended, and how long
// the run was planned to last (ns since the base).
type sent struct {
	scheduled, dropped int64
	end, planned       int64
}

// openLoop sends request i at i/rate, whatever happened to earlier ones; past -max-inflight a
// request is dropped (counted, not sent).
func openLoop(o options, r *runner, conns []*conn, frames [][]byte, w waiter) (sent, error) {
	total := max(int64(math.Round(o.rate*o.duration)), 1)
	period := 1e9 / o.rate
	sched := func(i int64) int64 { return int64(float64(i) * period) }
	dropped := int64(0)
	dirty := make([]bool, len(conns))
	for i := int64(0); i < total; {
		for now := r.now(); i < total && sched(i) <= now; i++ {
			if r.inflight.Load() >= o.maxInflight {
				dropped++
				continue
			}
			r.inflight.Add(1)
			k := int(i % int64(len(conns)))
			conns[k].submit(request{body: frames[i%int64(len(frames))], sched: sched(i)})
			dirty[k] = true
		}
		flushDirty(conns, dirty)
		if i < total {
			if err := w.waitUntil(sched(i)); err != nil {
				return sent{}, fmt.Errorf("waiting for the next send: %w", err)
			}
		}
	}
	return sent{scheduled: total, dropped: dropped, end: r.now(), planned: max(r.now(), int64(float64(total)/o.rate*1e9))}, nil
}

// closedLoop keeps -concurrency calls in flight for -duration (or until -requests were sent):
// whenever calls end, as many new ones go out, round-robin over the connections and the data
// file. A call's latency runs from when it was handed to its connection.
func closedLoop(o options, r *runner, conns []*conn, frames [][]byte) sent {
	end := int64(o.duration * 1e9)
	stop := time.NewTimer(time.Duration(end))
	defer stop.Stop()
	dirty := make([]bool, len(conns))
	var i int64
	for {
		now := r.now()
		if now >= end {
			break
		}
		if o.requests > 0 && i >= o.requests {
			break
		}
		for ; r.inflight.Load() < o.concurrency && (o.requests == 0 || i < o.requests); i++ {
			r.inflight.Add(1)
			k := int(i % int64(len(conns)))
			conns[k].submit(request{body: frames[i%int64(len(frames))], sched: r.now()})
			dirty[k] = true
		}
		flushDirty(conns, dirty)
		select {
		case <-r.freed:
		case <-stop.C:
		}
	}
	// The run lasts until sending stopped (its duration, or earlier after -requests) and its answers.
	now := r.now()
	return sent{scheduled: i, end: now, planned: now}
}

func flushDirty(conns []*conn, dirty []bool) {
	for k, c := range conns {
		if dirty[k] {
			c.flush()
			dirty[k] = false
		}
	}
}

// waitForAnswers lets every call end by its answer, a transport error or its timeout (the
// sweeper), whichever comes first.
func waitForAnswers(r *runner, lastSend int64, timeout time.Duration) {
	for r.inflight.Load() > 0 && r.now() < lastSend+int64(timeout)+int64(2*time.Second) {
		time.Sleep(time.Millisecond)
	}
}

// sweep expires calls older than the timeout, checking ten times per timeout (at most every 100 ms).
func sweep(r *runner, conns []*conn, timeout time.Duration) func() {
	every := min(timeout/10, 100*time.Millisecond)
	every = max(every, time.Millisecond)
	ticker := time.NewTicker(every)
	done := make(chan struct{})
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		for {
			select {
			case <-done:
				return
			case <-ticker.C:
				now := r.now()
				for _, c := range conns {
					c.expire(now, int64(timeout))
				}
			}
		}
	}()
	return func() {
		ticker.Stop()
		close(done)
		<-stopped
	}
}

// The names ghz uses for gRPC status codes (google.golang.org/grpc/codes), so reports compare.
var statusNames = [...]string{"OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound", "AlreadyExists", "PermissionDenied", "ResourceExhausted", "FailedPrecondition", "Aborted", "OutOfRange", "Unimplemented", "Internal", "Unavailable", "DataLoss", "Unauthenticated"}

func statusName(code int) string {
	if code >= 0 && code < len(statusNames) {
		return statusNames[code]
	}
	return "Code(" + strconv.Itoa(code) + ")"
}

// latencyMs are milliseconds; null when nothing was answered.
type latencyMs struct {
	Mean *float64 `json:"mean"`
	P50  *float64 `json:"p50"`
	P90  *float64 `json:"p90"`
	P99  *float64 `json:"p99"`
	P999 *float64 `json:"p999"`
	Max  *float64 `json:"max"`
}

type lagMs struct {
	P50 *float64 `json:"p50"`
	P99 *float64 `json:"p99"`
	Max *float64 `json:"max"`
}

type report struct {
	Tool            string           `json:"tool"`
	TargetRps       float64          `json:"targetRps"`
	Concurrency     int64            `json:"concurrency"`
	Connections     int              `json:"connections"`
	DurationSeconds float64          `json:"durationSeconds"`
	TimeoutSeconds  float64          `json:"timeoutSeconds"`
	Timer           string           `json:"timer"`
	Scheduled       int64            `json:"scheduled"`
	Sent            int64            `json:"sent"`
	Completed       int64            `json:"completed"`
	Dropped         int64            `json:"dropped"`
	TimedOut        int64            `json:"timedOut"`
	TransportErrors int64            `json:"transportErrors"`
	Seconds         float64          `json:"seconds"`
	Rps             float64          `json:"rps"`
	StatusCodes     map[string]int64 `json:"statusCodes"`
	ErrorMessages   map[string]int64 `json:"errorMessages"`
	LatencyMs       latencyMs        `json:"latencyMs"`
	SendLagMs       lagMs            `json:"sendLagMs"`
	LatencyMeasured string           `json:"latencyMeasured"`
}

// percentile is the nearest-rank percentile of sorted nanoseconds, in milliseconds.
func percentile(sorted []int64, p float64) *float64 {
	if len(sorted) == 0 {
		return nil
	}
	i := int(math.Ceil(p/100*float64(len(sorted)))) - 1
	i = min(max(i, 0), len(sorted)-1)
	return ms(sorted[i])
}

func ms(ns int64) *float64 {
	v := float64(ns) / 1e6
	return &v
}

func summarize(o options, s sent, timer string, results []outcomes) report {
	measured := "from each request's scheduled send time to its trailers (or trailers-only headers), for every call answered with a grpc-status"
	if o.concurrency > 0 {
		measured = "closed loop: from when each request was handed to its connection to its trailers (or trailers-only headers), for every call answered with a grpc-status"
	}
	rep := report{
		Tool:            "rategen",
		TargetRps:       o.rate,
		Concurrency:     o.concurrency,
		Connections:     o.connections,
		DurationSeconds: o.duration,
		TimeoutSeconds:  o.timeout.Seconds(),
		Timer:           timer,
		Scheduled:       s.scheduled,
		Dropped:         s.dropped,
		StatusCodes:     map[string]int64{},
		ErrorMessages:   map[string]int64{},
		LatencyMeasured: measured,
	}
	var latencies, lags []int64
	// The run lasts as planned (the open loop's schedule, the closed loop's duration), longer when
	// sending or answers went on past it.
	end := max(s.end, s.planned)
	for _, r := range results {
		latencies = append(latencies, r.latencies...)
		lags = append(lags, r.lags...)
		rep.Sent += r.sent
		rep.TimedOut += r.timedOut
		end = max(end, r.lastAnswer)
		for k, v := range r.statuses {
			rep.StatusCodes[k] += v
			rep.Completed += v
		}
		for k, v := range r.errors {
			rep.ErrorMessages[k] += v
			rep.TransportErrors += v
		}
	}
	rep.Seconds = float64(end) / 1e9
	if rep.Seconds > 0 {
		rep.Rps = float64(rep.Completed) / rep.Seconds
	}
	slices.Sort(latencies)
	slices.Sort(lags)
	if len(latencies) > 0 {
		var sum float64
		for _, l := range latencies {
			sum += float64(l)
		}
		mean := sum / float64(len(latencies)) / 1e6
		rep.LatencyMs.Mean = &mean
	}
	rep.LatencyMs.P50 = percentile(latencies, 50)
	rep.LatencyMs.P90 = percentile(latencies, 90)
	rep.LatencyMs.P99 = percentile(latencies, 99)
	rep.LatencyMs.P999 = percentile(latencies, 99.9)
	rep.LatencyMs.Max = percentile(latencies, 100)
	rep.SendLagMs.P50 = percentile(lags, 50)
	rep.SendLagMs.P99 = percentile(lags, 99)
	rep.SendLagMs.Max = percentile(lags, 100)
	return rep
}
