import ctypes, torch
torch.cuda.init(); torch.zeros(1, device="cuda")
for lib, name in [("generated/main-g128", "apex4gen_sm90_decode_sm90a_int8_g128_64x128x256_w1x4_s4_k1_f16"),
                  ("generated/h5b-g128", "apex4gen_sm90_decode_sm90a_int8_g128_64x192x128_w1x4_s2_k1_f16")]:
    f = getattr(ctypes.CDLL(lib + "/lib/libapex4gen.so"), name + "_split")
    for m in (1, 16):
        print(lib, "m", m, {g: f(m, n, k) for g, (n, k) in dict(qkv=(10240, 8192), o=(8192, 8192), gate_up=(57344, 8192), down=(8192, 28672)).items()})
