#!/usr/bin/env python3
"""bench/save_fd: a classic save of 2 GiB through `exec:cat > F` against QEMU handed F open (`fd:`).

A paused QEMU (system QEMU, TCG, q35) whose RAM is a 2 GiB shared file in /dev/shm, 75 % from
/dev/urandom (made once, kept as /dev/shm/savefd.ram), migrates its state to OUT (env, default
/var/tmp/savefd.bin; OUT=/dev/shm/savefd.bin leaves the disk out), 5 alternating runs of each.
Prints each run (written = migration completed, synced = after fsync) and the medians.
Usage: bench/save_fd.py (root not needed; about 2 GiB of /dev/shm, 1.5 GiB at OUT)
"""
RAM="/dev/shm/savefd.ram"; SZ=2<<30
if not os.path.exists(RAM):
    with open(RAM,"wb") as f:
        chunk=os.urandom(64<<20)
        for i in range(SZ*3//4//len(chunk)): f.write(chunk)
        f.truncate(SZ)
def qmp_open(path):
    c=socket.socket(socket.AF_UNIX); 
    for _ in range(500):
        try: c.connect(path); break
        except OSError: time.sleep(0.01)
    f=c.makefile("rw"); f.readline()
    return c,f
def cmd(c,f,ex,args=None,fd=None):
    msg=json.dumps({"execute":ex,**({"arguments":args} if args else {})})+"\n"
    if fd is not None:
        c.sendmsg([msg.encode()],[(socket.SOL_SOCKET,socket.SCM_RIGHTS,array.array("i",[fd]))])
    else:
        f.write(msg); f.flush()
    while True:
        r=json.loads(f.readline())
        if "return" in r or "error" in r: return r
def run(kind):
    s="/tmp/sfd.sock"
    try: os.unlink(s)
    except FileNotFoundError: pass
    p=subprocess.Popen(["qemu-system-x86_64","-nodefaults","-display","none","-accel","tcg","-machine","pc-q35-7.2","-m","2G",
        "-object",f"memory-backend-file,id=r,size=2G,mem-path={RAM},share=on","-machine","memory-backend=r","-S","-qmp",f"unix:{s},server=on,wait=off"])
    c,f=qmp_open(s); cmd(c,f,"qmp_capabilities")
    cmd(c,f,"migrate-set-parameters",{"max-bandwidth":16<<30})
    out=os.environ.get("OUT","/var/tmp/savefd.bin")
    if os.path.exists(out): os.unlink(out)
    t0=time.monotonic()
    if kind=="exec":
        cmd(c,f,"migrate",{"uri":f"exec:cat > {out}"})
    else:
        fd=os.open(out,os.O_WRONLY|os.O_CREAT|os.O_TRUNC,0o600)
        cmd(c,f,"getfd",{"fdname":"st"},fd=fd)
        os.close(fd)
        cmd(c,f,"migrate",{"uri":"fd:st"})
    while True:
        st=cmd(c,f,"query-migrate")["return"].get("status")
        if st in ("completed","failed"): break
        time.sleep(0.01)
    t1=time.monotonic()
    fd=os.open(out,os.O_RDONLY); os.fsync(fd); os.close(fd)
    t2=time.monotonic()
    p.kill(); p.wait()
    return st,(t1-t0)*1000,(t2-t0)*1000
res={"exec":[],"fd":[]}
for i in range(5):
    for k in ("exec","fd"):
        st,a,b=run(k); res[k].append((a,b)); print(k,st,"%.0f ms written, %.0f ms synced"%(a,b),flush=True)
for k,v in res.items():
    print(k,"median written %.0f ms, synced %.0f ms"%(statistics.median(x[0] for x in v),statistics.median(x[1] for x in v)))
os.unlink(os.environ.get("OUT", "/var/tmp/savefd.bin"))
