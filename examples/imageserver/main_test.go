package main

import (
	"bytes"
	"context"
	"encoding/json"
	"image/color"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"

	"github.com/imgcache/imgcache"
)

// TestMain fails the run if a goroutine outlives the tests: every server, cache, client and
// miniredis a test opens is closed by its cleanups.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// testEnv is one test's server: the sample images in a temporary directory, a cache on miniredis.
type testEnv struct {
	t     *testing.T
	cache *imgcache.Cache[imgcache.ImageMeta]
	dir   string
	srv   *httptest.Server
}

func newTestEnv(t *testing.T) *testEnv {
	t.Helper()
	mr := miniredis.RunT(t)
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr(), ContextTimeoutEnabled: true})
	t.Cleanup(func() { _ = rdb.Close() })
	log := slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
	cache, err := imgcache.New[imgcache.ImageMeta](imgcache.Options{Redis: rdb, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cache.Close() })
	dir := t.TempDir()
	if err := writeSamples(dir); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(newServer(cache, dir, log))
	t.Cleanup(srv.Close) // runs first: no request is in flight when the cache closes
	return &testEnv{t: t, cache: cache, dir: dir, srv: srv}
}

// do sends a request with the given header lines ("Name: value") and returns the response and body.
func (e *testEnv) do(method, path string, body []byte, header ...string) (*http.Response, []byte) {
	e.t.Helper()
	req, err := http.NewRequest(method, e.srv.URL+path, bytes.NewReader(body))
	if err != nil {
		e.t.Fatal(err)
	}
	for _, h := range header {
		name, value, _ := strings.Cut(h, ":")
		req.Header.Add(name, strings.TrimSpace(value))
	}
	resp, err := e.srv.Client().Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		e.t.Fatal(err)
	}
	return resp, b
}

// get is do for a GET that must answer want.
func (e *testEnv) get(path string, want int, header ...string) (*http.Response, []byte) {
	e.t.Helper()
	resp, body := e.do(http.MethodGet, path, nil, header...)
	if resp.StatusCode != want {
		e.t.Fatalf("GET %s %q: status %d, want %d; body %q", path, header, resp.StatusCode, want, body)
	}
	return resp, body
}

func (e *testEnv) file(name string) []byte {
	e.t.Helper()
	b, err := os.ReadFile(filepath.Join(e.dir, name))
	if err != nil {
		e.t.Fatal(err)
	}
	return b
}

func mustPNG(t *testing.T, w, h int) []byte {
	t.Helper()
	b, err := encodePNG(w, h, color.RGBA{R: 200, A: 255})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestGetServesImageThenHitsCache(t *testing.T) {
	e := newTestEnv(t)
	want := e.file("artists/1/avatar")
	fi, err := os.Stat(filepath.Join(e.dir, "artists/1/avatar"))
	if err != nil {
		t.Fatal(err)
	}

	resp, body := e.get("/images/artists/1/avatar", http.StatusOK)
	if !bytes.Equal(body, want) {
		t.Errorf("body is %d bytes, not the file's %d", len(body), len(want))
	}
	for name, want := range map[string]string{
		"Content-Type":   "image/png",
		"Content-Length": strconv.Itoa(len(want)),
		"Cache-Control":  "public, max-age=31536000, immutable",
		"Last-Modified":  fi.ModTime().UTC().Format(http.TimeFormat),
	} {
		if got := resp.Header.Get(name); got != want {
			t.Errorf("%s: %q, want %q", name, got, want)
		}
	}
	etag := resp.Header.Get("ETag")
	if !regexp.MustCompile(`^"[A-Za-z0-9_-]{22}"$`).MatchString(etag) {
		t.Errorf("ETag %q is not a quoted strong validator", etag)
	}
	if s := e.cache.Stats(); s.Loads != 1 || s.L1Hits != 0 {
		t.Fatalf("after the first GET: Loads %d, L1Hits %d; want 1, 0", s.Loads, s.L1Hits)
	}

	resp, body = e.get("/images/artists/1/avatar", http.StatusOK)
	if !bytes.Equal(body, want) || resp.Header.Get("ETag") != etag {
		t.Errorf("second GET: %d bytes, ETag %q; want the same response", len(body), resp.Header.Get("ETag"))
	}
	if s := e.cache.Stats(); s.Loads != 1 || s.L1Hits != 1 {
		t.Errorf("after the second GET: Loads %d, L1Hits %d; want 1, 1 (a hit, no second load)", s.Loads, s.L1Hits)
	}
}

func TestConditionalGet(t *testing.T) {
	e := newTestEnv(t)
	resp, _ := e.get("/images/albums/2/cover", http.StatusOK)
	etag, lastMod := resp.Header.Get("ETag"), resp.Header.Get("Last-Modified")
	modTime, err := http.ParseTime(lastMod)
	if err != nil {
		t.Fatal(err)
	}
	earlier := modTime.Add(-time.Hour).Format(http.TimeFormat)

	for _, tc := range []struct {
		name   string
		header []string
		want   int
	}{
		{"etag", []string{"If-None-Match: " + etag}, http.StatusNotModified},
		{"weak etag", []string{"If-None-Match: W/" + etag}, http.StatusNotModified},
		{"etag in list", []string{`If-None-Match: "other", W/"x,y",` + etag}, http.StatusNotModified},
		{"etag in second header", []string{`If-None-Match: "other"`, "If-None-Match: " + etag}, http.StatusNotModified},
		{"star", []string{"If-None-Match: *"}, http.StatusNotModified},
		{"other etag", []string{`If-None-Match: "other"`}, http.StatusOK},
		{"unquoted etag", []string{"If-None-Match: " + strings.Trim(etag, `"`)}, http.StatusOK},
		{"modified since: same time", []string{"If-Modified-Since: " + lastMod}, http.StatusNotModified},
		{"modified since: earlier", []string{"If-Modified-Since: " + earlier}, http.StatusOK},
		// If-None-Match decides alone when present (RFC 9110, 13.2.2).
		{"other etag, same time", []string{`If-None-Match: "other"`, "If-Modified-Since: " + lastMod}, http.StatusOK},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, body := e.get("/images/albums/2/cover", tc.want, tc.header...)
			if resp.Header.Get("ETag") != etag {
				t.Errorf("ETag %q, want %q", resp.Header.Get("ETag"), etag)
			}
			if tc.want == http.StatusNotModified && len(body) != 0 {
				t.Errorf("304 with a body of %d bytes", len(body))
			}
		})
	}
	if s := e.cache.Stats(); s.Loads != 1 {
		t.Errorf("Loads %d, want 1", s.Loads)
	}
}

func TestHeadHasNoBody(t *testing.T) {
	e := newTestEnv(t)
	resp, body := e.do(http.MethodHead, "/images/artists/2/background", nil)
	if resp.StatusCode != http.StatusOK || len(body) != 0 {
		t.Fatalf("HEAD: status %d, %d bytes of body; want 200, none", resp.StatusCode, len(body))
	}
	if got, want := resp.Header.Get("Content-Length"), strconv.Itoa(len(e.file("artists/2/background"))); got != want {
		t.Errorf("Content-Length %q, want %q", got, want)
	}
	if resp.Header.Get("ETag") == "" {
		t.Error("HEAD has no ETag")
	}
}

func TestNotFoundIsRemembered(t *testing.T) {
	e := newTestEnv(t)
	e.get("/images/artists/99/avatar", http.StatusNotFound)
	e.get("/images/artists/99/avatar", http.StatusNotFound)
	if s := e.cache.Stats(); s.Loads != 1 || s.NegativeHits != 1 {
		t.Errorf("Loads %d, NegativeHits %d; want 1, 1 (the second 404 from the cache)", s.Loads, s.NegativeHits)
	}
}

func TestBadRequests(t *testing.T) {
	e := newTestEnv(t)
	for _, path := range []string{
		"/images/artists/%0A/avatar",   // control character: the key's Err
		"/images/%20/1/avatar",         // empty entity after trimming: the key's Err
		"/images/artists/a%2Fb/avatar", // a separator inside a segment
		"/images/artists/%2E%2E/avatar",
		"/images/artists/1/.upload-123",
	} {
		if resp, body := e.do(http.MethodGet, path, nil); resp.StatusCode != http.StatusBadRequest {
			t.Errorf("GET %s: status %d, want 400; body %q", path, resp.StatusCode, body)
		}
	}
	resp, _ := e.do(http.MethodPost, "/images/artists/1/avatar", nil)
	if resp.StatusCode != http.StatusMethodNotAllowed || !strings.Contains(resp.Header.Get("Allow"), "PUT") {
		t.Errorf("POST: status %d, Allow %q; want 405 listing GET, HEAD and PUT", resp.StatusCode, resp.Header.Get("Allow"))
	}
	if s := e.cache.Stats(); s.Loads != 0 {
		t.Errorf("Loads %d: a bad request reached the loader", s.Loads)
	}
}

func TestPutReplacesImage(t *testing.T) {
	e := newTestEnv(t)
	resp, _ := e.get("/images/artists/3/avatar", http.StatusOK)
	oldETag := resp.Header.Get("ETag")

	img := mustPNG(t, 100, 50)
	if resp, body := e.do(http.MethodPut, "/images/artists/3/avatar", img); resp.StatusCode != http.StatusNoContent {
		t.Fatalf("PUT: status %d, want 204; body %q", resp.StatusCode, body)
	}
	resp, body := e.get("/images/artists/3/avatar", http.StatusOK)
	if etag := resp.Header.Get("ETag"); etag == oldETag || etag == "" {
		t.Errorf("ETag after PUT %q, want a new one (old %q)", etag, oldETag)
	}
	if !bytes.Equal(body, img) {
		t.Errorf("GET after PUT: %d bytes, want the %d uploaded", len(body), len(img))
	}
	// The old ETag no longer validates the client's copy.
	e.get("/images/artists/3/avatar", http.StatusOK, "If-None-Match: "+oldETag)

	if resp, _ := e.do(http.MethodPut, "/images/artists/3/avatar", []byte("not an image")); resp.StatusCode != http.StatusUnsupportedMediaType {
		t.Errorf("PUT of text: status %d, want 415", resp.StatusCode)
	}
}

func TestPutCreatesRememberedNotFound(t *testing.T) {
	e := newTestEnv(t)
	e.get("/images/albums/7/cover", http.StatusNotFound) // remembered for NegativeTTL...
	img := mustPNG(t, 10, 10)
	if resp, _ := e.do(http.MethodPut, "/images/albums/7/cover", img); resp.StatusCode != http.StatusCreated {
		t.Fatalf("PUT: status %d, want 201", resp.StatusCode)
	}
	_, body := e.get("/images/albums/7/cover", http.StatusOK) // ...until PUT deletes it
	if !bytes.Equal(body, img) {
		t.Errorf("GET after PUT: %d bytes, want the %d uploaded", len(body), len(img))
	}
}

// TestStaleMetadataIsReloaded changes a file behind the cache's back, as a PUT on another instance
// does while this instance's L1 still holds the old metadata.
func TestStaleMetadataIsReloaded(t *testing.T) {
	e := newTestEnv(t)
	resp, _ := e.get("/images/albums/1/cover", http.StatusOK)
	img := mustPNG(t, 300, 30)
	if _, err := replaceFile(filepath.Join(e.dir, "albums/1/cover"), img); err != nil {
		t.Fatal(err)
	}
	resp2, body := e.get("/images/albums/1/cover", http.StatusOK)
	if !bytes.Equal(body, img) || resp2.Header.Get("ETag") == resp.Header.Get("ETag") {
		t.Errorf("after the file changed: %d bytes, ETag %q; want the new %d bytes and a new ETag",
			len(body), resp2.Header.Get("ETag"), len(img))
	}
	if got, want := resp2.Header.Get("Content-Length"), strconv.Itoa(len(img)); got != want {
		t.Errorf("Content-Length %s, want %s", got, want)
	}
}

func TestMetricsAndStats(t *testing.T) {
	e := newTestEnv(t)
	e.get("/images/artists/1/background", http.StatusOK)
	e.get("/images/artists/1/background", http.StatusOK)

	_, metrics := e.get("/metrics", http.StatusOK)
	for _, want := range []string{
		`imgcache_hits_total{cache="images",level="l1"} 1`,
		`imgcache_loads_total{cache="images"} 1`,
	} {
		if !strings.Contains(string(metrics), want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}

	_, body := e.get("/stats", http.StatusOK)
	var st struct {
		L1Hits, Loads uint64
		HitRate       float64
	}
	if err := json.Unmarshal(body, &st); err != nil {
		t.Fatalf("/stats: %v: %s", err, body)
	}
	if st.L1Hits != 1 || st.Loads != 1 || st.HitRate != 0.5 {
		t.Errorf("/stats: %s; want L1Hits 1, Loads 1, HitRate 0.5", body)
	}
}

// TestRun runs the whole program, embedded miniredis included, on a free port.
func TestRun(t *testing.T) {
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	logs := &syncBuffer{}
	env := map[string]string{"ADDR": "127.0.0.1:0"}
	done := make(chan error, 1)
	go func() { done <- run(ctx, func(k string) string { return env[k] }, logs) }()

	listening := regexp.MustCompile(`msg=listening addr=(\S+)`)
	var addr string
	for deadline := time.Now().Add(10 * time.Second); addr == ""; time.Sleep(10 * time.Millisecond) {
		select {
		case err := <-done:
			t.Fatalf("run returned early: %v; log:\n%s", err, logs)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("run did not log its address; log:\n%s", logs)
		}
		if m := listening.FindStringSubmatch(logs.String()); m != nil {
			addr = m[1]
		}
	}

	client := &http.Client{Transport: &http.Transport{}}
	defer client.CloseIdleConnections()
	resp, err := client.Get("http://" + addr + "/images/artists/1/avatar")
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "image/png" {
		t.Errorf("GET: status %d, Content-Type %q", resp.StatusCode, resp.Header.Get("Content-Type"))
	}

	cancel()
	if err := <-done; err != nil {
		t.Fatalf("run: %v", err)
	}
	if !strings.Contains(logs.String(), "started an embedded miniredis") {
		t.Errorf("run did not log the embedded miniredis; log:\n%s", logs)
	}
}

// syncBuffer is a bytes.Buffer that run's goroutines can log to while the test reads it.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
